"""Drawing primitives for the toy world: a head pose projection and anti-aliased sub-pixel polygons.

Determinism across machines is the point of this module's shape:
- geometry is computed point by point with Python's `math` on scalars (numpy's vectorized sin/cos/exp may
  take different SIMD code paths on different CPUs and differ in the last bit, which can flip a rounded
  pixel);
- shapes are filled with `cv2.fillPoly(..., cv2.LINE_AA, shift=SHIFT)` on integer fixed-point vertices,
  which is integer arithmetic inside OpenCV.

Coordinates: pixel (row i, column j) has its centre at (x=j, y=i), x right, y down (cv2's and insightface's
convention). OpenCV's anti-aliased fill spreads a polygon's edge by about 0.6 px, symmetrically, so the
centre of a filled symmetric shape stays where it was asked to be (to ~0.1 px).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

SHIFT = 4  # fractional bits of the fixed-point vertices handed to OpenCV (1/16 px)
_SCALE = 1 << SHIFT

Point = tuple[float, float]
RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Pose:
    """Orthographic projection of canonical face points (x right, y down, z toward the camera) to pixels.

    cx, cy: pixel position of the canonical origin; unit: pixels per canonical unit (> 0);
    roll: in-plane rotation, yaw: turn about the vertical axis, pitch: nod about the horizontal axis,
    all in radians. Yaw moves points with depth z sideways (the nose more than the eyes, the ears the other
    way) and squashes x by cos(yaw): the "small yaw" of a frontal-ish face.
    """

    cx: float
    cy: float
    unit: float
    roll: float = 0.0
    yaw: float = 0.0
    pitch: float = 0.0

    def __post_init__(self) -> None:
        # The projection is linear: fold yaw, pitch and roll into one 2x3 matrix once (scalar math only).
        cy_, sy_ = math.cos(self.yaw), math.sin(self.yaw)
        cp, sp = math.cos(self.pitch), math.sin(self.pitch)
        cr, sr = math.cos(self.roll), math.sin(self.roll)
        # x1 = x cy + z sy;  z1 = -x sy + z cy;  y1 = y cp - z1 sp;  u = x1 cr - y1 sr;  v = x1 sr + y1 cr
        x1 = (cy_, 0.0, sy_)
        y1 = (sy_ * sp, cp, -cy_ * sp)
        u = tuple(self.unit * (a * cr - b * sr) for a, b in zip(x1, y1))
        v = tuple(self.unit * (a * sr + b * cr) for a, b in zip(x1, y1))
        object.__setattr__(self, "_m", (u, v))

    def project(self, x: float, y: float, z: float = 0.0) -> Point:
        (ux, uy, uz), (vx, vy, vz) = self._m  # type: ignore[attr-defined]
        return self.cx + ux * x + uy * y + uz * z, self.cy + vx * x + vy * y + vz * z

    def project_all(self, points: Iterable[Point], z: float = 0.0) -> list[Point]:
        (ux, uy, uz), (vx, vy, vz) = self._m  # type: ignore[attr-defined]
        u0, v0 = self.cx + uz * z, self.cy + vz * z
        return [(u0 + ux * x + uy * y, v0 + vx * x + vy * y) for x, y in points]


def ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 32, angle: float = 0.0) -> list[Point]:
    """n points on an ellipse centred at (cx, cy) with radii rx, ry, rotated by `angle` radians."""
    ca, sa = math.cos(angle), math.sin(angle)
    pts = []
    for i in range(n):
        t = 2.0 * math.pi * i / n
        ex, ey = rx * math.cos(t), ry * math.sin(t)
        pts.append((cx + ex * ca - ey * sa, cy + ex * sa + ey * ca))
    return pts


def arc(cx: float, cy: float, rx: float, ry: float, t0: float, t1: float, n: int = 16) -> list[Point]:
    """n + 1 points on an elliptical arc from angle t0 to t1 (radians, y down: pi/2 is the bottom)."""
    return [
        (cx + rx * math.cos(t0 + (t1 - t0) * i / n), cy + ry * math.sin(t0 + (t1 - t0) * i / n))
        for i in range(n + 1)
    ]


def stroke(points: Sequence[Point], half_width: float | Sequence[float]) -> list[Point]:
    """A polyline thickened into a closed polygon (for brows, lid lines, mouth lines, frames).

    half_width: one value, or one per point (for tapered strokes); same units as the points.
    """
    n = len(points)
    widths = [half_width] * n if isinstance(half_width, (int, float)) else list(half_width)
    left, right = [], []
    for i in range(n):
        x0, y0 = points[max(i - 1, 0)]
        x1, y1 = points[min(i + 1, n - 1)]
        dx, dy = x1 - x0, y1 - y0
        norm = math.hypot(dx, dy) or 1.0
        nx, ny = -dy / norm, dx / norm
        px, py = points[i]
        left.append((px + nx * widths[i], py + ny * widths[i]))
        right.append((px - nx * widths[i], py - ny * widths[i]))
    return left + right[::-1]


def chaikin(points: Sequence[Point], iterations: int = 2) -> list[Point]:
    """Smooth an open polyline by corner cutting (keeps both end points): control points -> a soft curve."""
    pts = list(points)
    for _ in range(iterations):
        out = [pts[0]]
        for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
            out.append((0.75 * x0 + 0.25 * x1, 0.75 * y0 + 0.25 * y1))
            out.append((0.25 * x0 + 0.75 * x1, 0.25 * y0 + 0.75 * y1))
        out.append(pts[-1])
        pts = out
    return pts


def _fixed(points: Sequence[Point]) -> np.ndarray:
    """Pixel points -> (N, 1, 2) int32 fixed-point vertices (round half up; elementwise IEEE ops only)."""
    pts = np.asarray(points, dtype=np.float64)
    return np.floor(pts * float(_SCALE) + 0.5).astype(np.int32).reshape(-1, 1, 2)


def fill(
    image: np.ndarray, points: Sequence[Point], colour: RGB | int, *, holes: Sequence[Sequence[Point]] = ()
) -> None:
    """Fill one polygon (pixel coordinates) into `image` in place, anti-aliased.

    holes: polygons inside it left unfilled (OpenCV fills several contours even-odd: a ring is an outer
    and an inner contour).
    """
    if len(points) < 3:
        return
    col = (int(colour),) * 3 if isinstance(colour, (int, np.integer)) else tuple(int(c) for c in colour)
    if image.ndim == 2:
        col = col[0]
    cv2.fillPoly(image, [_fixed(points)] + [_fixed(h) for h in holes], col, cv2.LINE_AA, SHIFT)


def shade(rgb: RGB, factor: float) -> RGB:
    """rgb scaled by `factor` (darker < 1 < lighter), clipped to 0..255."""
    return tuple(int(min(255, max(0, round(c * factor)))) for c in rgb)  # type: ignore[return-value]


def mix(a: RGB, b: RGB, t: float) -> RGB:
    """(1 - t) * a + t * b, rounded."""
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))  # type: ignore[return-value]


class Layer:
    """A transparent RGBA drawing surface: premultiplied RGB on black plus a coverage (alpha) channel.

    Drawing anti-aliased shapes onto black and the same shapes' coverage into `alpha` gives premultiplied
    colour at the outer silhouette for free; `to_rgba` divides it back out.
    """

    def __init__(self, height: int, width: int) -> None:
        self.rgb = np.zeros((height, width, 3), np.uint8)
        self.alpha = np.zeros((height, width), np.uint8)

    def fill(
        self,
        points: Sequence[Point],
        colour: RGB,
        *,
        solid: bool = True,
        holes: Sequence[Sequence[Point]] = (),
    ) -> None:
        """Fill a polygon; `solid` shapes also extend the silhouette (interior details need not)."""
        fill(self.rgb, points, colour, holes=holes)
        if solid:
            fill(self.alpha, points, 255, holes=holes)

    def to_rgba(self) -> np.ndarray:
        """(H, W, 4) uint8 straight (non-premultiplied) RGBA; fully transparent pixels are (0, 0, 0, 0)."""
        rgb = self.rgb.copy()
        rgb[self.alpha == 0] = 0
        edge = (self.alpha > 0) & (self.alpha < 255)  # only partly covered pixels need the division
        a = self.alpha[edge].astype(np.int32)[:, None]
        rgb[edge] = np.minimum((self.rgb[edge].astype(np.int32) * 255 + a // 2) // a, 255).astype(np.uint8)
        return np.concatenate([rgb, self.alpha[..., None]], axis=2)


def composite(canvas: np.ndarray, rgba: np.ndarray, x0: int, y0: int) -> None:
    """Alpha-blend straight `rgba` (h, w, 4) onto `canvas` (H, W, 3) uint8 in place, top-left at (x0, y0).

    Integer arithmetic (deterministic); the parts outside the canvas are dropped.
    """
    h, w = rgba.shape[:2]
    H, W = canvas.shape[:2]
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, W), min(y0 + h, H)
    if cx0 >= cx1 or cy0 >= cy1:
        return
    patch = rgba[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0].astype(np.int32)
    a = patch[..., 3:4]
    region = canvas[cy0:cy1, cx0:cx1].astype(np.int32)
    canvas[cy0:cy1, cx0:cx1] = ((patch[..., :3] * a + region * (255 - a) + 127) // 255).astype(np.uint8)
