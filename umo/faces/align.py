"""5-point similarity alignment to the ArcFace 112x112 template, with a differentiable warp.

Two halves, kept apart on purpose:
- `similarity_transforms` is pure numpy and has no gradient: landmarks come from a detector that never
  sees a gradient either. It fits, for all K faces at once, the least-squares similarity (Umeyama, with
  the reflection correction) from the 5 landmarks to the template, and says which faces are usable.
- `warp_faces` is torch: it cuts the K crops out of the B images with one `affine_grid` + one
  `grid_sample`, so the reward's gradient reaches the generated pixels.

Conventions (the same as OpenCV's `warpAffine` and insightface's `estimate_norm`/`norm_crop`): pixel i
has its center at coordinate i, x to the right, y down; a (2, 3) matrix M maps SOURCE pixel coordinates to
TEMPLATE pixel coordinates, and the crop samples the source at M^-1 (template pixel).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# insightface's `arcface_dst` for 112x112 crops (x already includes the +8 px shift of the 96x112 original).
# Stored by insightface as float32; we keep exactly those float32 values (widened to float64) so that our
# matrices equal `estimate_norm`'s to float precision rather than differing by the decimal rounding.
ARCFACE_TEMPLATE: np.ndarray = np.array(
    [
        [38.2946, 51.6963],  # left eye (image-left)
        [73.5318, 51.5014],  # right eye
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # left mouth corner
        [70.7299, 92.2041],  # right mouth corner
    ],
    dtype=np.float32,
).astype(np.float64)
ARCFACE_TEMPLATE.setflags(write=False)

# Degeneracy thresholds (defaults of `similarity_transforms`).
# The spread of a point set along its minor axis is s_min / sqrt(5), s_min the smallest singular value of
# the centered (5, 2) landmarks: the RMS distance of the points from their best-fit line. On the template
# it is ~14 px for a 35 px eye distance (0.4x), so 1 px only rejects faces with eyes ~2.5 px apart, whose
# crop would be pure upsampling noise, and landmarks that sit (nearly) on a line or on one point.
MIN_SPREAD_PX = 1.0
# Minor/major spread ratio: a real face, even in profile, is far from a line (template ~0.8; strong profile
# ~0.2). Below 0.05 the landmarks are a line with noise and the fitted rotation is arbitrary.
MIN_ASPECT = 0.05


def similarity_transforms(
    landmarks: np.ndarray,
    *,
    image_size: int = 112,
    image_hw: tuple[int, int] | None = None,
    margin: float = 0.0,
    min_spread: float = MIN_SPREAD_PX,
    min_aspect: float = MIN_ASPECT,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit the source->template similarity of every face at once (closed-form Umeyama, vectorized).

    landmarks:  (K, 5, 2) source pixel coordinates (x, y), insightface's order (see `Detections`).
    image_size: crop side S; the template is `ARCFACE_TEMPLATE * S / 112` (S a multiple of 112, as
                insightface's `estimate_norm` requires for the arcface template).
    image_hw:   (H, W) of the source image; when given, a face with any landmark outside the image (pixel
                centers 0..W-1 / 0..H-1, extended by `margin` px on each side) is invalid. Data prep uses it to
                pick whole faces; the reward and the judge do not: both keep such a face and crop it with a
                black border (umo.reward, umo.faces.embed.norm_crops).
    min_spread, min_aspect: degeneracy thresholds, see `MIN_SPREAD_PX` and `MIN_ASPECT`.

    Returns (matrices, valid):
      matrices: (K, 2, 3) float64, M with template_px = M[:, :2] @ source_px + M[:, 2] (cv2.warpAffine's M);
                all-NaN for invalid faces so that using one by mistake is loud (`warp_faces` refuses it).
      valid:    (K,) bool; False for non-finite (or > 1e6 px) landmarks, (near-)collinear or coincident landmarks, a fitted
                scale that is not finite and > 0, or (with image_hw) landmarks outside the image.
    Never raises for degenerate faces: the caller skips and counts them.
    """
    lmk = np.asarray(landmarks, dtype=np.float64)
    if lmk.ndim != 3 or lmk.shape[1:] != (5, 2):
        raise ValueError(f"landmarks must be (K, 5, 2), got shape {lmk.shape}")
    if image_size <= 0 or image_size % 112:
        raise ValueError(f"image_size must be a positive multiple of 112, got {image_size}")
    k = lmk.shape[0]
    dst = ARCFACE_TEMPLATE * (image_size / 112.0)

    # Coordinates beyond 1e6 px are garbage from a broken detector, and would overflow the squares below.
    valid = (np.isfinite(lmk) & (np.abs(lmk) < 1e6)).all(axis=(1, 2))
    # Replace unusable rows by the template itself so the batched linear algebra below sees no NaN/inf
    # (no RuntimeWarnings, no LinAlgError); their results are discarded through `valid`.
    src = np.where(valid[:, None, None], lmk, dst[None])

    if image_hw is not None:
        h, w = image_hw
        x, y = src[..., 0], src[..., 1]
        inside = (x >= -margin) & (x <= w - 1 + margin) & (y >= -margin) & (y <= h - 1 + margin)
        valid &= inside.all(axis=1)

    mu_s = src.mean(axis=1, keepdims=True)  # (K, 1, 2)
    mu_d = dst.mean(axis=0)  # (2,)
    src_c = src - mu_s
    dst_c = dst - mu_d

    # Spread of the landmarks: singular values of the centered (5, 2) point sets, largest first.
    spread = np.linalg.svd(src_c, compute_uv=False) / np.sqrt(5.0)  # (K, 2) RMS px along major/minor axis
    valid &= spread[:, 1] >= min_spread
    valid &= spread[:, 1] >= min_aspect * spread[:, 0]

    # Umeyama (1991): cov = dst_c^T src_c / n, R = U diag(d) V^T, d = (1, sign det cov) excludes reflections.
    cov = np.einsum("pi,kpj->kij", dst_c, src_c) / 5.0  # (K, 2, 2)
    u, sv, vt = np.linalg.svd(cov)
    d = np.ones((k, 2))
    d[:, 1] = np.where(np.linalg.det(cov) < 0, -1.0, 1.0)
    rot = u @ (d[:, :, None] * vt)  # (K, 2, 2)
    var_s = (src_c**2).sum(axis=(1, 2)) / 5.0
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = (sv * d).sum(axis=1) / var_s
    valid &= np.isfinite(scale) & (scale > 0)

    a = scale[:, None, None] * rot
    t = mu_d[None] - np.einsum("kij,kj->ki", a, mu_s[:, 0])
    matrices = np.concatenate([a, t[:, :, None]], axis=2)
    valid &= np.isfinite(matrices).all(axis=(1, 2))
    matrices[~valid] = np.nan
    return matrices, valid


def _normalized_theta(matrices: torch.Tensor, src_hw: tuple[int, int], size: int) -> torch.Tensor:
    """(K, 2, 3) source->template pixel matrices -> (K, 2, 3) normalized template->source affine_grid thetas.

    With align_corners=False, pixel center i of an axis of length L has normalized coordinate (2i + 1)/L - 1;
    theta = N_src @ M^-1 @ N_dst^-1 in homogeneous 3x3 form, computed in float64.
    """
    h, w = src_hw
    m = matrices.to(torch.float64)
    k = m.shape[0]
    bottom = m.new_tensor([0.0, 0.0, 1.0]).expand(k, 1, 3)
    inv = torch.linalg.inv(torch.cat([m, bottom], dim=1))  # template px -> source px
    n_src = m.new_tensor([[2.0 / w, 0.0, 1.0 / w - 1.0], [0.0, 2.0 / h, 1.0 / h - 1.0], [0.0, 0.0, 1.0]])
    # normalized template coordinate u -> template pixel (u + 1) * S / 2 - 1/2
    half, off = size / 2.0, (size - 1) / 2.0
    n_dst_inv = m.new_tensor([[half, 0.0, off], [0.0, half, off], [0.0, 0.0, 1.0]])
    return (n_src @ inv @ n_dst_inv)[:, :2]


def warp_faces(
    images: torch.Tensor,
    image_index: torch.Tensor,
    matrices: np.ndarray | torch.Tensor,
    *,
    size: int = 112,
    fill: float = 0.0,
) -> torch.Tensor:
    """Cut K aligned face crops out of B images, differentiably w.r.t. the images.

    images:      (B, C, H, W) float (any range, any device; float32 or float64).
    image_index: (K,) integer, which image each face comes from, in [0, B).
    matrices:    (K, 2, 3) source->template pixel matrices (from `similarity_transforms`, valid faces only);
                 numpy or torch on any device; must be finite and invertible. They carry no gradient (the
                 landmarks come from a detector run without one).
    size:        output side S in pixels (the matrices must target an S x S template).
    fill:        the value of every channel outside the source, in the images' units (the reward passes the
                 [-1, 1] value of a black pixel, -1, so its crops match the judge's; see umo.reward).

    Returns (K, C, S, S) in the images' dtype: bilinear samples, `fill` outside the source, matching
    `cv2.warpAffine(img, M, (S, S), flags=INTER_LINEAR, borderValue=fill)` up to OpenCV's fixed-point rounding.
    K = 0 gives an empty (0, C, S, S) tensor (no graph: there is nothing to differentiate).
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(
            f"images must be a (B, C, H, W) float tensor, got {tuple(images.shape)} {images.dtype}"
        )
    b, c, h, w = images.shape
    # The K matrices and indices are tiny: validate them and build theta on the CPU in float64 (exact enough
    # for any image size, and available where the accelerator lacks float64), then move theta once.
    mats = torch.as_tensor(matrices).detach().to("cpu", torch.float64)
    image_index = torch.as_tensor(image_index).detach().cpu()
    if mats.ndim != 3 or mats.shape[1:] != (2, 3):
        raise ValueError(f"matrices must be (K, 2, 3), got {tuple(mats.shape)}")
    if image_index.ndim != 1 or image_index.shape[0] != mats.shape[0] or image_index.is_floating_point():
        raise ValueError(
            f"image_index must be a (K,) integer tensor with K = {mats.shape[0]} (one per matrix), "
            f"got {tuple(image_index.shape)} {image_index.dtype}"
        )
    k = mats.shape[0]
    if k == 0:
        return images.new_zeros((0, c, size, size))
    if int(image_index.min()) < 0 or int(image_index.max()) >= b:
        raise ValueError(f"image_index values must be in [0, {b}), got {image_index.tolist()}")
    if not bool(torch.isfinite(mats).all()):
        raise ValueError(
            "matrices contain NaN/inf: pass only the faces marked valid by similarity_transforms"
        )

    theta = _normalized_theta(mats, (h, w), size).to(device=images.device, dtype=images.dtype)
    # (K, C, H, W); gradients scatter back to the B images
    src = images.index_select(0, image_index.to(device=images.device, dtype=torch.long))
    grid = F.affine_grid(theta, [k, c, size, size], align_corners=False)
    if fill == 0.0:
        return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # grid_sample only pads with zeros: shift the pixels so that `fill` is the zero, then shift back (the
    # gradient is the same; bilinear weights at the border blend with `fill` exactly as cv2's constant border).
    return F.grid_sample(src - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
