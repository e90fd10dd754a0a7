"""Alignment: Umeyama matrices vs skimage/insightface, the torch warp vs cv2.warpAffine, degenerate faces."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest
import torch
from skimage.transform import SimilarityTransform

from umo.faces.align import ARCFACE_TEMPLATE, similarity_transforms, warp_faces

H, W = 300, 320


def face_landmarks(center: tuple[float, float], scale: float, angle_deg: float, rng=None, noise: float = 0.0):
    """Template landmarks scaled / rotated about the template center and moved to `center` (source px)."""
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    pts = (ARCFACE_TEMPLATE - ARCFACE_TEMPLATE.mean(0)) @ rot.T * scale + np.asarray(center)
    if noise:
        pts = pts + rng.normal(0, noise, pts.shape)
    return pts


# Frontal, rotated, small (upsampled), large (downsampled), and two partly outside the image (the crop
# reaches the zero border while the landmarks stay inside).
FACES = np.stack(
    [
        face_landmarks((160, 150), 1.0, 0, np.random.default_rng(1), 1.5),
        face_landmarks((100, 120), 1.3, 35, np.random.default_rng(2), 1.5),
        face_landmarks((220, 90), 0.45, -50, np.random.default_rng(3), 0.5),
        face_landmarks((170, 160), 2.4, 170, np.random.default_rng(4), 3.0),
        face_landmarks((25, 30), 0.9, 20, np.random.default_rng(5), 1.0),
        face_landmarks((292, 268), 1.1, -15, np.random.default_rng(6), 1.0),
    ]
)


def to_chw(img: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).to(dtype)


def test_template_is_insightface_arcface_dst():
    from insightface.utils.face_align import arcface_dst

    assert ARCFACE_TEMPLATE.shape == (5, 2) and ARCFACE_TEMPLATE.dtype == np.float64
    np.testing.assert_array_equal(ARCFACE_TEMPLATE, arcface_dst.astype(np.float64))


@pytest.mark.parametrize("image_size", [112, 224])
def test_matrices_match_skimage_and_estimate_norm(image_size):
    from insightface.utils.face_align import estimate_norm

    rng = np.random.default_rng(0)
    lmk = np.stack(
        [
            face_landmarks(rng.uniform(60, 900, 2), rng.uniform(0.3, 5), rng.uniform(-90, 90), rng, 2.0)
            for _ in range(64)
        ]
    )
    mats, valid = similarity_transforms(lmk, image_size=image_size)
    assert mats.shape == (64, 2, 3) and mats.dtype == np.float64 and valid.all()
    dst = ARCFACE_TEMPLATE * image_size / 112
    for m, pts in zip(mats, lmk):
        ref = SimilarityTransform.from_estimate(pts, dst).params[:2]
        np.testing.assert_allclose(m, ref, rtol=0, atol=1e-9)
        with warnings.catch_warnings():  # insightface calls skimage's deprecated `estimate`
            warnings.simplefilter("ignore", FutureWarning)
            ins = estimate_norm(pts, image_size)
        # estimate_norm computes in float32 (its template is float32): agree to float32 precision.
        np.testing.assert_allclose(m, ins, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("image_dtype", ["uint8", "float32"])
def test_warp_agrees_with_cv2_warpaffine(image_dtype):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (H, W, 3)).astype(np.uint8)
    src = img if image_dtype == "uint8" else img.astype(np.float32)
    mats, valid = similarity_transforms(FACES, image_hw=(H, W))
    assert valid.all()
    crops = warp_faces(to_chw(img)[None], torch.zeros(len(FACES), dtype=torch.long), mats)
    assert crops.shape == (len(FACES), 3, 112, 112) and crops.dtype == torch.float32
    for m, crop in zip(mats, crops):
        ref = cv2.warpAffine(
            src, m, (112, 112), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
        ).astype(np.float32)
        diff = np.abs(crop.permute(1, 2, 0).numpy() - ref) / 255.0
        # uint8 cv2 rounds to integers (~0.25/255 mean); float cv2 only quantizes its weights (1/32 px).
        assert diff.mean() < (1 / 255 if image_dtype == "uint8" else 1e-4), diff.mean()
    # the partly-outside faces really did reach the zero border
    assert (crops[4] == 0).all(dim=0).float().mean() > 0.05
    assert (crops[5] == 0).all(dim=0).float().mean() > 0.05


def test_warp_float64_matches_float32():
    rng = np.random.default_rng(1)
    img = torch.from_numpy(rng.random((2, 3, H, W)))
    mats, _ = similarity_transforms(FACES[:3])
    idx = torch.tensor([1, 0, 1])
    out64 = warp_faces(img, idx, mats)
    out32 = warp_faces(img.float(), idx, torch.from_numpy(mats))
    assert out64.dtype == torch.float64 and out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out64, rtol=0, atol=1e-4)


def test_warp_identity_matrix_is_exact_copy():
    # M = identity, size = W = H: every template pixel center falls exactly on the same source pixel center.
    img = torch.rand(1, 2, 16, 16, dtype=torch.float64)
    eye = np.array([[[1.0, 0, 0], [0, 1.0, 0]]])
    torch.testing.assert_close(warp_faces(img, torch.tensor([0]), eye, size=16), img, rtol=0, atol=1e-12)


def test_warp_gradcheck():
    torch.manual_seed(0)
    img = torch.rand(1, 1, 12, 12, dtype=torch.float64, requires_grad=True)
    a = np.deg2rad(25.0)
    # source 12x12 -> 8x8 template, rotated and shrunk, partly outside the source.
    m = np.array([[[0.7 * np.cos(a), -0.7 * np.sin(a), 1.5], [0.7 * np.sin(a), 0.7 * np.cos(a), -0.5]]])
    idx = torch.tensor([0])
    assert torch.autograd.gradcheck(lambda x: warp_faces(x, idx, m, size=8), (img,), eps=1e-6, atol=1e-5)


def test_batch_equals_one_at_a_time_and_grads_go_to_the_right_image():
    rng = np.random.default_rng(2)
    imgs = torch.from_numpy(rng.random((3, 3, H, W))).float().requires_grad_(True)
    idx = torch.tensor([2, 0, 2, 1, 0])
    mats, valid = similarity_transforms(FACES[:5])
    assert valid.all()
    batch = warp_faces(imgs, idx, mats)
    for k in range(5):
        alone = warp_faces(imgs[idx[k]][None], torch.tensor([0]), mats[k : k + 1])
        torch.testing.assert_close(batch[k : k + 1], alone, rtol=0, atol=1e-6)
    # only image 1 feeds face 3
    batch[3].sum().backward()
    assert imgs.grad[1].abs().sum() > 0
    assert imgs.grad[0].abs().sum() == 0 and imgs.grad[2].abs().sum() == 0


def test_empty_batch():
    imgs = torch.rand(2, 3, 20, 20)
    out = warp_faces(imgs, torch.zeros(0, dtype=torch.long), np.zeros((0, 2, 3)))
    assert out.shape == (0, 3, 112, 112) and out.dtype == imgs.dtype
    mats, valid = similarity_transforms(np.zeros((0, 5, 2)))
    assert mats.shape == (0, 2, 3) and valid.shape == (0,)


def test_degenerate_landmarks_are_invalid_not_errors():
    good = FACES[0]
    line = np.stack([np.linspace(50, 150, 5), np.linspace(60, 100, 5)], axis=1)  # collinear
    near_line = line + np.random.default_rng(0).normal(0, 0.3, line.shape)  # a line with detector noise
    point = np.full((5, 2), 80.0)  # coincident
    tiny = face_landmarks((100, 100), 0.05, 0)  # eyes < 2 px apart
    nan = good.copy()
    nan[2, 1] = np.nan
    inf = good.copy()
    inf[0, 0] = np.inf
    huge = good * 1e300
    batch = np.stack([good, line, near_line, point, tiny, nan, inf, huge, FACES[1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from NaN / singular math either
        mats, valid = similarity_transforms(batch)
    assert valid.tolist() == [True, False, False, False, False, False, False, False, True]
    assert np.isfinite(mats[valid]).all() and np.isnan(mats[~valid]).all()
    # valid faces are unaffected by their degenerate neighbours
    alone, _ = similarity_transforms(batch[[0, 8]])
    np.testing.assert_array_equal(mats[[0, 8]], alone)
    # an invalid matrix is refused by the warp instead of producing NaN crops
    with pytest.raises(ValueError, match="valid"):
        warp_faces(torch.rand(1, 3, H, W), torch.tensor([0, 0]), mats[[0, 1]])


def test_landmarks_outside_the_image():
    inside = face_landmarks((160, 150), 1.0, 0)
    left = inside - [150, 0]  # eye x < 0
    below = inside + [0, 160]  # mouth y > H - 1
    batch = np.stack([inside, left, below])
    _, valid = similarity_transforms(batch)
    assert valid.all()  # without image_hw there is nothing to check against
    _, valid = similarity_transforms(batch, image_hw=(H, W))
    assert valid.tolist() == [True, False, False]
    overhang = max(-left[:, 0].min(), below[:, 1].max() - (H - 1))
    _, valid = similarity_transforms(batch, image_hw=(H, W), margin=float(overhang) + 0.1)
    assert valid.all()


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="K, 5, 2"):
        similarity_transforms(np.zeros((3, 4, 2)))
    with pytest.raises(ValueError, match="image_index"):
        warp_faces(torch.rand(1, 3, 8, 8), torch.tensor([0, 0]), np.tile(np.eye(2, 3), (1, 1, 1)))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        warp_faces(torch.rand(1, 3, 8, 8), torch.tensor([1]), np.tile(np.eye(2, 3), (1, 1, 1)))
