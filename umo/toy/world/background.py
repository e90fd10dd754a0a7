"""Scene backgrounds for the toy world: a setting's two-tone backdrop plus non-face clutter and distractors.

Clutter (boxes, discs, blobs, stripes, poles, triangles) gives edges and colours everywhere; distractors
are the hard negatives a face detector must learn to reject: skin-coloured ovals without features, backs
of heads (an oval of hair over a little skin), balls and plates. None has eyes, a nose or a mouth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from umo.toy.world.draw import RGB, Point, ellipse, fill, shade, stroke
from umo.toy.world.identity import HAIR_COLOURS, SKIN_TONES


@dataclass(frozen=True)
class Palette:
    """Colours of one setting: `upper` (sky/wall) over `lower` (ground/floor) split at a horizon that lies
    in `horizon` (fractions of the height), and the typical colours of its objects."""

    upper: RGB
    lower: RGB
    horizon: tuple[float, float]
    objects: tuple[RGB, ...]


# Caption phrase -> palette. Scenes pick among these; "in a studio" is for portraits only.
SETTINGS: dict[str, Palette] = {
    "in a park": Palette(
        (140, 192, 235), (96, 150, 72), (0.35, 0.6), ((60, 110, 50), (110, 80, 50), (200, 60, 50))
    ),
    "on a beach": Palette(
        (150, 200, 240), (226, 206, 160), (0.3, 0.5), ((40, 110, 190), (240, 120, 60), (250, 230, 90))
    ),
    "in a kitchen": Palette(
        (226, 216, 192), (150, 112, 80), (0.55, 0.8), ((240, 240, 235), (160, 165, 170), (200, 90, 60))
    ),
    "in an office": Palette(
        (204, 208, 212), (118, 120, 132), (0.55, 0.8), ((60, 70, 90), (240, 240, 240), (90, 130, 180))
    ),
    "on a city street": Palette(
        (172, 178, 190), (88, 88, 94), (0.4, 0.65), ((150, 70, 60), (200, 190, 170), (230, 200, 40))
    ),
    "in a living room": Palette(
        (212, 182, 150), (128, 88, 60), (0.55, 0.8), ((90, 60, 110), (60, 120, 110), (230, 210, 170))
    ),
    "in a garden": Palette(
        (162, 206, 236), (82, 132, 62), (0.3, 0.55), ((220, 70, 120), (250, 220, 60), (50, 100, 40))
    ),
    "on a stage": Palette(
        (32, 26, 46), (62, 42, 36), (0.6, 0.85), ((250, 240, 180), (180, 30, 40), (90, 60, 160))
    ),
    "at a party": Palette(
        (72, 52, 112), (42, 32, 62), (0.55, 0.8), ((250, 90, 160), (60, 200, 220), (250, 220, 60))
    ),
    "in a library": Palette(
        (122, 82, 52), (92, 62, 42), (0.6, 0.85), ((150, 40, 40), (40, 80, 130), (200, 170, 90))
    ),
    "in a studio": Palette((120, 124, 132), (96, 98, 106), (0.7, 0.95), ((150, 150, 160), (80, 84, 92))),
}
SCENE_SETTINGS: tuple[str, ...] = tuple(k for k in SETTINGS if k != "in a studio")


def _jitter(rng: np.random.Generator, rgb: RGB, amount: float) -> RGB:
    out = tuple(int(min(255, max(0, c + rng.uniform(-amount, amount)))) for c in rgb)
    return out  # type: ignore[return-value]


def vertical_gradient(top: RGB, bottom: RGB, rows: int, width: int) -> np.ndarray:
    """(rows, width, 3) float32 vertical blend from `top` to `bottom` (basic arithmetic only)."""
    t = (np.arange(rows, dtype=np.float32) / np.float32(max(rows - 1, 1)))[:, None, None]
    a, b = np.asarray(top, np.float32), np.asarray(bottom, np.float32)
    return np.broadcast_to(a + (b - a) * t, (rows, width, 3))


def _blob(cx: float, cy: float, r: float, rng: np.random.Generator, n: int = 40) -> list[Point]:
    """A random smooth closed blob (3 harmonics) of radius ~r around (cx, cy)."""
    harmonics = [
        (k, float(rng.uniform(0.0, 0.25 / k)), float(rng.uniform(0.0, 2 * math.pi))) for k in (2, 3, 5)
    ]
    pts = []
    for i in range(n):
        t = 2 * math.pi * i / n
        rr = r * (1.0 + sum(a * math.cos(k * t + ph) for k, a, ph in harmonics))
        pts.append((cx + rr * math.cos(t), cy + rr * math.sin(t)))
    return pts


def _clutter(img: np.ndarray, rng: np.random.Generator, palette: Palette) -> None:
    h, w = img.shape[:2]
    for _ in range(int(rng.integers(8, 20))):
        base = palette.objects[int(rng.integers(0, len(palette.objects)))]
        if rng.random() < 0.7:
            colour = _jitter(rng, base, 30)
        else:
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))  # type: ignore[assignment]
        kind = int(rng.integers(0, 6))
        cx, cy = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        r = float(rng.uniform(0.04, 0.22)) * min(h, w)
        if kind == 0:  # box (furniture, window, sign)
            a = float(rng.uniform(-0.3, 0.3))
            rw, rh = r * float(rng.uniform(0.5, 1.6)), r * float(rng.uniform(0.5, 1.6))
            ca, sa = math.cos(a), math.sin(a)
            corners = [(-rw, -rh), (rw, -rh), (rw, rh), (-rw, rh)]
            fill(img, [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in corners], colour)
        elif kind == 1:  # disc (lamp, sun, plate)
            fill(img, ellipse(cx, cy, r, r, 40), colour)
        elif kind == 2:  # blob (bush, cloud, rug)
            fill(img, _blob(cx, cy, r, rng), colour)
        elif kind == 3:  # stripes (blinds, fence, shelf)
            a = float(rng.uniform(0, math.pi))
            ca, sa = math.cos(a), math.sin(a)
            n, gap = int(rng.integers(3, 8)), r * float(rng.uniform(0.25, 0.5))
            other = shade(colour, float(rng.uniform(0.5, 1.4)))
            for k in range(n):
                off = (k - n / 2) * gap
                p0 = (cx - ca * r * 1.5 - sa * off, cy - sa * r * 1.5 + ca * off)
                p1 = (cx + ca * r * 1.5 - sa * off, cy + sa * r * 1.5 + ca * off)
                fill(img, stroke([p0, p1], gap * 0.3), colour if k % 2 else other)
        elif kind == 4:  # pole / edge
            x0 = cx + float(rng.uniform(-0.1, 0.1)) * w
            fill(img, stroke([(cx, cy - 2 * r), (x0, cy + 3 * r)], max(1.0, 0.08 * r)), colour)
        else:  # triangle (roof, tent, pennant)
            corners = [(cx + float(rng.uniform(-r, r)), cy + float(rng.uniform(-r, r))) for _ in range(3)]
            fill(img, corners, colour)


def _distractors(img: np.ndarray, rng: np.random.Generator) -> None:
    """Face-sized things that are not faces (see the module docstring)."""
    h, w = img.shape[:2]
    for _ in range(int(rng.integers(0, 4))):
        kind = int(rng.integers(0, 4))
        cx, cy = float(rng.uniform(0.05, 0.95)) * w, float(rng.uniform(0.05, 0.95)) * h
        r = float(rng.uniform(0.06, 0.18)) * min(h, w)
        skin = _jitter(rng, SKIN_TONES[int(rng.integers(0, len(SKIN_TONES)))], 14)
        angle = float(rng.uniform(-0.5, 0.5))
        if kind == 0:  # bare skin-coloured oval
            fill(img, ellipse(cx, cy, r, r * float(rng.uniform(1.05, 1.45)), 40, angle), skin)
        elif kind == 1:  # the back of a head: hair almost everywhere, a little skin at the nape
            hair = HAIR_COLOURS[int(rng.integers(0, len(HAIR_COLOURS) - 1))]
            fill(img, ellipse(cx, cy + 0.9 * r, 0.4 * r, 0.5 * r, 24, angle), skin)
            fill(img, ellipse(cx, cy, r, 1.2 * r, 40, angle), _jitter(rng, hair, 15))
        elif kind == 2:  # ball with a highlight
            ball: RGB = tuple(int(c) for c in rng.integers(30, 256, 3))  # type: ignore[assignment]
            fill(img, ellipse(cx, cy, r, r, 40), ball)
            fill(img, ellipse(cx - 0.35 * r, cy - 0.35 * r, 0.25 * r, 0.2 * r, 20), shade(ball, 1.5))
        else:  # plate / mirror: a rim and a plain face
            rim: RGB = tuple(int(c) for c in rng.integers(120, 256, 3))  # type: ignore[assignment]
            fill(img, ellipse(cx, cy, r, r * 1.1, 40, angle), rim)
            fill(img, ellipse(cx, cy, 0.8 * r, 0.88 * r, 40, angle), _jitter(rng, skin, 30))


def render_background(rng: np.random.Generator, height: int, width: int, setting: str) -> np.ndarray:
    """(height, width, 3) uint8 RGB backdrop for `setting` (a key of SETTINGS), with clutter, distractors
    and a slight depth-of-field blur. Deterministic given the rng state."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; expected one of {sorted(SETTINGS)}")
    pal = SETTINGS[setting]
    upper, lower = _jitter(rng, pal.upper, 18), _jitter(rng, pal.lower, 18)
    horizon = int(round(height * float(rng.uniform(*pal.horizon))))
    img = np.empty((height, width, 3), np.float32)
    img[:horizon] = vertical_gradient(shade(upper, 1.08), upper, horizon, width)
    img[horizon:] = vertical_gradient(lower, shade(lower, 0.78), height - horizon, width)
    out = np.clip(img + np.float32(0.5), 0, 255).astype(np.uint8)
    _clutter(out, rng, pal)
    _distractors(out, rng)
    sigma = float(rng.uniform(0.4, 1.6))
    return cv2.GaussianBlur(out, (0, 0), sigmaX=sigma, sigmaY=sigma)
