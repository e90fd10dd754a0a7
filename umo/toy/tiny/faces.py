"""Synthetic face models and images for tests and benchmarks (NOT the toy world).

Everything here exists so the real face code paths (ONNX export -> insightface routing -> batched decode)
can be exercised offline, in milliseconds, with exactly known answers. It is not a model of faces:
- a "face" is an identity texture patch (`identity_patch`) pasted on a dull background
  (`random_background`) with a pure green square marker (RGB 0, 255, 0) drawn on its nose point;
- `MarkerDetector` is an analytic detector (no trained weights) that finds those markers and reports a
  box and five ArcFace-ordered landmarks around each, in insightface's SCRFD 9-output signature.

The toy world (procedurally rendered identities with trained face models) is a separate, later module.

Coordinates: pixel (row i, column j) has its center at (x=j, y=i), the convention of cv2 and of
insightface's landmarks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from umo.faces.align import ARCFACE_TEMPLATE
from umo.faces.types import Detections
from umo.toy.onnx_export import SCRFD_INPUT_MEAN, SCRFD_INPUT_STD

NOSE = 2  # index of the nose tip in ARCFACE_TEMPLATE

# SCRFD input normalization: (pixel - MEAN) / STD, RGB, NCHW.
INPUT_MEAN, INPUT_STD = SCRFD_INPUT_MEAN, SCRFD_INPUT_STD

# Textures keep the greenness G - (R + B) / 2 at or below this (pixel units); the marker has 255.
# MarkerDetector's mask ramps from 48 to 248, so nothing but the marker (and its resampled edges) responds.
MAX_TEXTURE_GREENNESS = 40.0


def face_landmarks(center_xy: Sequence[float], face_size: float) -> np.ndarray:
    """Five ArcFace-ordered landmarks of a synthetic face whose nose is at `center_xy`.

    center_xy: (x, y) in pixels; face_size: side of the face square in pixels (112 = template size).
    Returns (5, 2) float32 in pixels: the ArcFace 112 template scaled by face_size / 112 and moved so
    its nose (index 2) lands on center_xy.

    >>> face_landmarks((100, 50), 112)[2].tolist()
    [100.0, 50.0]
    """
    center = np.asarray(center_xy, dtype=np.float32).reshape(2)
    offsets = (ARCFACE_TEMPLATE - ARCFACE_TEMPLATE[NOSE]) * (float(face_size) / 112.0)
    return (offsets + center).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, lo: float, hi: float) -> np.ndarray:
    """(h, w, 3) float32 smooth colour noise in [lo, hi]: a coarse random grid upsampled bicubically."""
    coarse = rng.uniform(lo, hi, size=(cells, cells, 3)).astype(np.float32)
    return np.clip(cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC), lo, hi)


def _limit_green(rgb: np.ndarray) -> np.ndarray:
    """Clip G so that G - (R + B) / 2 <= MAX_TEXTURE_GREENNESS; float in, uint8 out."""
    rgb = rgb.astype(np.float32, copy=True)
    rgb[..., 1] = np.minimum(rgb[..., 1], (rgb[..., 0] + rgb[..., 2]) / 2 + MAX_TEXTURE_GREENNESS)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def identity_patch(seed: int, size: int = 64) -> np.ndarray:
    """A deterministic texture standing for one identity: (size, size, 3) RGB uint8.

    Smooth colour blobs plus a little fine grain; the same seed always gives the same patch, different
    seeds give visibly different ones. No pixel looks like the green marker.
    """
    rng = np.random.default_rng([int(seed), 0x1D])
    base = _smooth_noise(rng, size, size, cells=5, lo=40.0, hi=220.0)
    grain = rng.normal(0.0, 6.0, size=(size, size, 3)).astype(np.float32)
    return _limit_green(base + grain)


def random_background(seed: int, h: int, w: int) -> np.ndarray:
    """A dull, low-contrast noise background: (h, w, 3) RGB uint8, no green-marker response."""
    rng = np.random.default_rng([int(seed), 0xB6])
    base = _smooth_noise(rng, h, w, cells=6, lo=70.0, hi=150.0)
    grain = rng.normal(0.0, 4.0, size=(h, w, 3)).astype(np.float32)
    return _limit_green(base + grain)


def _paste_clipped(image: np.ndarray, patch: np.ndarray, x0: int, y0: int) -> None:
    """Write `patch` into `image` with its top-left at (x0, y0), dropping what falls outside."""
    h, w = image.shape[:2]
    ph, pw = patch.shape[:2]
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + pw, w), min(y0 + ph, h)
    if ix0 >= ix1 or iy0 >= iy1:
        return
    image[iy0:iy1, ix0:ix1] = patch[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]


def paste_faces(
    canvas: np.ndarray,
    faces: Sequence[tuple[np.ndarray, Sequence[float]]],
    face_size: int,
    marker: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Paste synthetic faces on a copy of `canvas` and mark each nose with a green square.

    canvas: (H, W, 3) RGB uint8 (left untouched); faces: (patch, (x, y) nose point) pairs, a patch being
    any (h, w, 3) uint8 image (resized to face_size x face_size when it is not). Each patch is centered on
    its nose point; the marker is a `marker` x `marker` square of pure green whose pixel centers average to
    within 0.5 px of the nose point.
    Returns (image (H, W, 3) uint8, landmarks (K, 5, 2) float32: the true `face_landmarks` of each face).
    """
    if canvas.dtype != np.uint8 or canvas.ndim != 3 or canvas.shape[2] != 3:
        raise ValueError(f"canvas must be (H, W, 3) uint8, got {canvas.dtype} {canvas.shape}")
    if marker < 1:
        raise ValueError(f"marker must be >= 1 px, got {marker}")
    image = canvas.copy()
    landmarks = []
    for patch, center in faces:
        if patch.shape[:2] != (face_size, face_size):
            patch = cv2.resize(patch, (face_size, face_size), interpolation=cv2.INTER_AREA)
        cx, cy = float(center[0]), float(center[1])
        # Pixel centers of a side-n square starting at x0 average to x0 + (n - 1) / 2.
        _paste_clipped(image, patch, math.floor(cx - (face_size - 1) / 2 + 0.5),
                       math.floor(cy - (face_size - 1) / 2 + 0.5))
        green = np.zeros((marker, marker, 3), np.uint8)
        green[..., 1] = 255
        _paste_clipped(image, green, math.floor(cx - (marker - 1) / 2 + 0.5),
                       math.floor(cy - (marker - 1) / 2 + 0.5))
        landmarks.append(face_landmarks((cx, cy), face_size))
    lms = np.stack(landmarks) if landmarks else np.zeros((0, 5, 2), np.float32)
    return image, lms.astype(np.float32)


class MarkerDetector(nn.Module):
    """Analytic SCRFD-signature detector for the green nose markers of `paste_faces` images.

    Input: (B, 3, H, W) float32, RGB normalized as (pixel - 127.5) / 128, H and W multiples of 32.
    Output: 9 tensors in insightface's SCRFD order (strides 8, 16, 32; 2 anchors per cell; batched):
        scores (B, H/s * W/s * 2, 1) in [0, 1], then bbox (B, ..., 4), then kps (B, ..., 10),
    distances in units of the stride from the anchor center (x = col * s, y = row * s).

    How it finds a marker (all stride 8; strides 16 and 32 score 0 everywhere):
    1. per pixel, mask = greenness G - (R + B) / 2 ramped linearly from 0 at 48 to 1 at 248 (pixel
       units): 1 on the marker, 0 on textures, partial on marker edges blurred by letterbox resizing;
    2. per cell, three sums over a 40 x 40 window around its anchor, [a - 16, a + 24): the mask mass M,
       and the mask-weighted x and y offsets from the anchor, giving the marker centroid (dx, dy);
    3. score = sigmoid(M above a minimum mass) * sigmoid(|dx| and |dy| below ~5 px): the cell whose
       anchor is nearest the centroid fires (a neighbour may too; it decodes to the same box, NMS drops it);
    4. the face scale is sqrt(M) / marker_px (the marker's side at the network's resolution over its
       nominal side), so the box (side face_size * scale) and the landmarks (`face_landmarks` offsets)
       follow letterbox resizing.
    The first anchor of each cell carries the detection, the second scores 0.

    Accuracy: at scale 1 landmarks and boxes are exact up to the marker's own 0.5 px rounding (an even
    side cannot be centered on an integer point); through letterbox resizing (scale 0.5..3) landmarks
    stay within ~2 px and box edges within ~2-3 px (the mass undercounts blurred marker edges).

    Limits: the marker's side at the network's resolution must stay within about 4..24 px, and markers
    must be at least ~40 px apart (the window). The marker may sit anywhere, not only on the grid.
    """

    strides = (8, 16, 32)
    num_anchors = 2
    # Each stride-8 cell sums the pixels at offsets [-16, 24) from its anchor: conv padding 16 with a
    # 40-wide kernel gives exactly H/8 x W/8 cells without a Pad node (the legacy exporter emits a
    # reversed Slice for F.pad and warns about it).
    window = 40
    window_pad = 16

    def __init__(self, face_size: float = 64.0, marker_px: int = 8, mask_from: float = 48.0,
                 mask_to: float = 248.0) -> None:
        """face_size: face side in pixels at scale 1; marker_px: the marker's side at scale 1 (their
        ratio is how the scale is read); mask_from/mask_to: greenness ramp of the mask, pixel units."""
        super().__init__()
        if not MAX_TEXTURE_GREENNESS < mask_from < mask_to <= 255.0:
            raise ValueError(f"need {MAX_TEXTURE_GREENNESS} < mask_from < mask_to <= 255, "
                             f"got {mask_from}, {mask_to}")
        self.face_size = float(face_size)
        self.marker_px = int(marker_px)
        # Greenness is computed on normalized input, where one pixel unit is 1 / INPUT_STD.
        self.mask_from = float(mask_from) / INPUT_STD
        self.mask_span = float(mask_to - mask_from) / INPUT_STD
        # Below (marker_px / 2)^2 / 2 pixels of mask a cell does not fire: tolerates a 2x letterbox
        # downscale of the marker while ignoring stray pixels.
        self.min_mass = (self.marker_px / 2.0) ** 2 / 2.0
        self.register_buffer("green_weight", torch.tensor([-0.5, 1.0, -0.5]).view(1, 3, 1, 1))
        n = self.window
        offsets = torch.arange(n, dtype=torch.float32) - self.window_pad  # pixel offset from the anchor
        ones = torch.ones(n, n)
        sums = torch.stack([ones, offsets.view(1, n).expand(n, n), offsets.view(n, 1).expand(n, n)])
        self.register_buffer("window_sums", sums.unsqueeze(1).contiguous())  # (3, 1, n, n): M, Sx, Sy
        lm = face_landmarks((0.0, 0.0), self.face_size)  # offsets of the 5 landmarks from the nose
        self.register_buffer("lm_offsets", torch.from_numpy(lm.reshape(1, 10, 1, 1).copy()))
        self.register_buffer("box_signs", torch.tensor([-1.0, -1.0, 1.0, 1.0]).view(1, 4, 1, 1))

    @staticmethod
    def _anchors_flat(first: torch.Tensor, second: torch.Tensor, channels: int) -> torch.Tensor:
        """(B, C, h, w) per-cell values of anchors 0 and 1 -> (B, h * w * 2, C), SCRFD's anchor order."""
        both = torch.stack([first.permute(0, 2, 3, 1), second.permute(0, 2, 3, 1)], dim=3)
        # C as a Python int keeps the exported graph's last output dimension static.
        return both.reshape(first.shape[0], -1, channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s = self.strides[0]
        greenness = F.conv2d(x, self.green_weight)
        mask = ((greenness - self.mask_from) / self.mask_span).clamp(0.0, 1.0)
        # Zero padding is right: the mask is 0 off the marker.
        sums = F.conv2d(mask, self.window_sums, stride=s, padding=self.window_pad)
        mass, sx, sy = sums.split(1, dim=1)
        # eps far below a marker's mass (>= min_mass) but large enough that empty cells stay finite and
        # agree between torch and onnxruntime.
        dx = sx / (mass + 1e-3)
        dy = sy / (mass + 1e-3)
        score = (
            torch.sigmoid(2.0 * (mass - self.min_mass))
            * torch.sigmoid(3.0 * (5.0 - dx.abs()))
            * torch.sigmoid(3.0 * (5.0 - dy.abs()))
        )
        scale = torch.sqrt(mass.clamp(min=0.0)) / self.marker_px
        centroid = torch.cat([dx, dy], dim=1)  # (B, 2, h, w)
        # SCRFD decodes x1, y1 = anchor - d[0:2] and x2, y2 = anchor + d[2:4]: a square of side
        # face_size * scale centered on the centroid.
        bbox = (torch.cat([centroid, centroid], dim=1) * self.box_signs + (self.face_size / 2) * scale) / s
        kps = (torch.cat([centroid] * 5, dim=1) + self.lm_offsets * scale) / s
        outs_score = [self._anchors_flat(score, torch.zeros_like(score), 1)]
        outs_bbox = [self._anchors_flat(bbox, bbox, 4)]
        outs_kps = [self._anchors_flat(kps, kps, 10)]
        for stride in self.strides[1:]:
            # Zeros shaped by the input, so the graph stays dynamic in H and W.
            zero = F.avg_pool2d(x.mean(dim=1, keepdim=True), stride) * 0.0
            outs_score.append(self._anchors_flat(zero, zero, 1))
            box0, kps0 = zero.expand(-1, 4, -1, -1), zero.expand(-1, 10, -1, -1)
            outs_bbox.append(self._anchors_flat(box0, box0, 4))
            outs_kps.append(self._anchors_flat(kps0, kps0, 10))
        return (*outs_score, *outs_bbox, *outs_kps)


class FixedFaces:
    """A stand-in detector that reports the same faces at known places in every image.

    For training tests on a generator that cannot draw faces yet (a tiny random one): the reward then
    embeds whatever the generator paints at those places, and its gradient teaches it to paint the
    references there. centers: nose positions (x, y) px; face_size: face side px (landmarks from
    `face_landmarks`). Same interface as `FaceDetector.detect_tensor`.
    """

    def __init__(self, centers: Sequence[Sequence[float]], face_size: float) -> None:
        self.landmarks = np.stack([face_landmarks(c, face_size) for c in centers]).astype(np.float32)
        half = face_size / 2
        self.boxes = np.array([[x - half, y - half, x + half, y + half] for x, y in centers], np.float32)
        self.scores = np.linspace(0.99, 0.9, len(centers)).astype(np.float32)

    def detect_tensor(self, images: torch.Tensor) -> list[Detections]:
        return [Detections(self.boxes.copy(), self.landmarks.copy(), self.scores.copy())
                for _ in range(images.shape[0])]
