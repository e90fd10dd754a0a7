"""Draw one toy face: an identity's traits under one image's pose, lighting and expression.

`draw_face` returns a transparent RGBA patch with the 5 landmarks exactly where they were drawn, the face
box, and what a scene needs to attach a body. All geometry is built in canonical face units (see
`umo.toy.world.identity`), projected by a `Pose` and filled anti-aliased with sub-pixel vertices.

Landmarks (insightface order, image-left first): the two pupil centres (the iris and the pupil are
circles centred on them), the centre of the nose-tip ball, and the two mouth corners (where the lip
curves meet). Depths (z, toward the camera) make yaw move the nose more than the eyes and the ears the
other way.

Box rule (what SCRFD/RetinaFace, trained on WIDER FACE, call a face box): the axis-aligned bounds, after
pose, of the skin outline of the head (no ears, no hair) cut at the forehead line one eye-to-mouth
distance above the eye centres (or the top of the head, if lower): cheek to cheek, forehead to chin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from umo.toy.world.draw import RGB, Layer, Point, Pose, arc, chaikin, ellipse, fill, shade, stroke
from umo.toy.world.identity import Identity

# Pixels per canonical unit = UNIT_FRACTION * patch size * variation.scale: leaves room for an afro or
# long hair under any roll (the farthest hair point lies ~2.3 units from the origin).
UNIT_FRACTION = 0.19

SCLERA_RGB: RGB = (244, 240, 234)
PUPIL_RGB: RGB = (22, 18, 18)
LID_RGB: RGB = (52, 36, 34)
MOUTH_INSIDE_RGB: RGB = (96, 28, 34)
TEETH_RGB: RGB = (238, 234, 222)

# Depths of the parts (canonical units, + toward the camera).
Z_EAR, Z_BACK_HAIR, Z_HAIR = -0.15, -0.3, 0.05
Z_EYE, Z_BROW, Z_NOSE, Z_MOUTH, Z_GLASSES = 0.28, 0.32, 0.5, 0.35, 0.42


@dataclass(frozen=True)
class FaceVariation:
    """Per-image changes of one face. Angles in degrees; `shift` in fractions of the patch size."""

    roll_deg: float = 0.0  # in-plane rotation, +-15
    yaw_deg: float = 0.0  # turn left/right, +-22 (features shift sideways, the head squashes)
    pitch_deg: float = 0.0  # nod, +-10
    scale: float = 1.0  # size multiplier, 0.9..1.1
    shift: tuple[float, float] = (0.0, 0.0)  # (dx, dy) of the head in the patch, +-0.03
    brightness: float = 0.0  # added after contrast, pixel units, +-30
    contrast: float = 1.0  # around mid-grey 128, 0.75..1.2
    cast: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per-channel RGB gains (colour of the light)
    light_deg: float = 0.0  # direction the light comes from, in the image plane (0 = from the right)
    gradient: float = 0.0  # strength of the linear shading across the head, 0..0.35
    relief: float = 0.0  # soft darkening toward the face edges (roundness), 0..0.3
    mouth_open: float = 0.0  # 0 closed .. 1 wide open
    smile: float = 0.0  # -0.25 (frown) .. 1 (broad smile)
    eye_open: float = 1.0  # multiplier of the identity's eye opening, 0.75..1.1

    @staticmethod
    def neutral() -> "FaceVariation":
        """Frontal, unlit, closed mouth: the identity as defined (for tests and references)."""
        return FaceVariation()


def sample_variation(rng: np.random.Generator) -> FaceVariation:
    """Draw one image's pose, lighting and expression from `rng` (14 scalar draws, fixed order)."""
    u = rng.uniform
    mouth_open = float(u(0.25, 1.0)) if rng.random() < 0.3 else 0.0
    return FaceVariation(
        roll_deg=float(u(-15.0, 15.0)),
        yaw_deg=float(u(-22.0, 22.0)),
        pitch_deg=float(u(-10.0, 10.0)),
        scale=float(u(0.9, 1.1)),
        shift=(float(u(-0.03, 0.03)), float(u(-0.03, 0.03))),
        brightness=float(u(-30.0, 30.0)),
        contrast=float(u(0.75, 1.2)),
        cast=(float(u(0.88, 1.12)), float(u(0.9, 1.1)), float(u(0.88, 1.12))),
        light_deg=float(u(0.0, 360.0)),
        gradient=float(u(0.0, 0.35)),
        relief=float(u(0.1, 0.3)),
        mouth_open=mouth_open,
        smile=float(u(-0.25, 1.0)),
        eye_open=float(u(0.75, 1.1)),
    )


@dataclass(frozen=True)
class FacePatch:
    """One drawn face.

    rgba:      (S, S, 4) uint8 straight RGBA, transparent around the head.
    landmarks: (5, 2) float32 patch pixels, insightface order (left eye, right eye, nose, mouth L, mouth R).
    box:       (4,) float32 x1, y1, x2, y2 patch pixels (the module's box rule).
    chin:      (x, y) patch pixels of the chin point; unit: pixels per canonical unit (for the body).
    neck_rgb:  the lit skin colour in shadow, for a neck drawn by the scene.
    """

    rgba: np.ndarray
    landmarks: np.ndarray
    box: np.ndarray
    chin: tuple[float, float]
    unit: float
    neck_rgb: RGB


@dataclass(frozen=True)
class _Geometry:
    """Canonical positions derived from an identity and an expression."""

    H: float
    eye_y: float
    nose_y: float
    mouth_y: float
    corner_y: float
    mouth_w: float
    hairline_y: float
    side_y: float
    brow_top: float


def _geometry(idt: Identity, var: FaceVariation) -> _Geometry:
    nose_y = idt.eye_y + idt.nose_length
    mouth_y = nose_y + idt.mouth_gap
    brow_top = idt.eye_y - idt.brow_gap - idt.brow_thickness
    brow_top -= max(idt.brow_arch, 0.0) + abs(idt.brow_tilt) / 2
    return _Geometry(
        H=idt.head_aspect,
        eye_y=idt.eye_y,
        nose_y=nose_y,
        mouth_y=mouth_y,
        corner_y=mouth_y - 0.05 * var.smile,
        mouth_w=idt.mouth_width * (1.0 + 0.08 * var.smile),
        hairline_y=-idt.hairline * idt.head_aspect,
        side_y=idt.eye_y - 0.08,
        brow_top=brow_top,
    )


def half_width(idt: Identity, y: float) -> float:
    """Half-width of the head's skin outline at canonical height y (0 outside [-H, H])."""
    H = idt.head_aspect
    t = y / H
    if abs(t) >= 1.0:
        return 0.0
    if t < 0:
        return math.sqrt(1.0 - t * t)
    n = idt.chin_square
    return math.pow(1.0 - math.pow(t, n), 1.0 / n) * (1.0 - (1.0 - idt.jaw_width) * t * t)


def outline(idt: Identity, n: int = 72) -> list[Point]:
    """n canonical points of the head's skin outline: an ellipse on top, a tapered superellipse below."""
    H, e = idt.head_aspect, 2.0 / idt.chin_square
    pts = []
    for i in range(n):
        phi = 2.0 * math.pi * i / n
        c, s = math.cos(phi), math.sin(phi)
        if s < 0:
            pts.append((c, H * s))
        else:
            t = math.pow(s, e)
            x = math.copysign(math.pow(abs(c), e), c) * (1.0 - (1.0 - idt.jaw_width) * t * t)
            pts.append((x, H * t))
    return pts


def _skull(H: float, grow: float, phi: float) -> Point:
    return (1.0 + grow) * math.cos(phi), H * (1.0 + grow) * math.sin(phi)


def _skull_arc(H: float, grow: float, y_end: float, n: int = 28) -> list[Point]:
    """The top of the (grown) skull from the left side at height y_end, over the top, to the right side."""
    s = max(-0.999, min(0.999, y_end / (H * (1.0 + grow))))
    phi_l, phi_r = math.pi - math.asin(s), 2.0 * math.pi + math.asin(s)
    return [_skull(H, grow, phi_l + (phi_r - phi_l) * i / n) for i in range(n + 1)]


def _hairline(idt: Identity, g: _Geometry) -> list[Point]:
    """The front edge of the hair on the forehead, from the right temple to the left, per style."""
    xs = half_width(idt, g.side_y)
    hl, side = g.hairline_y, g.side_y
    fringe = max(g.brow_top - 0.07, hl + 0.1)  # just above the brows
    style = idt.hair_style
    if style == "fringe":
        pts = [(xs, side), (0.85 * xs, fringe + 0.1)]
        teeth = 10
        for i in range(teeth + 1):  # a slightly jagged straight cut
            x = 0.8 * xs - 1.6 * xs * i / teeth
            pts.append((x, fringe + (0.035 if i % 2 else 0.0)))
        pts += [(-0.85 * xs, fringe + 0.1), (-xs, side)]
        return pts
    if style == "side_part":
        s = 1.0 if idt.identity_id % 2 else -1.0
        ctrl = [
            (s * xs, side),
            (s * 0.8, hl + 0.1),
            (s * 0.35, hl - 0.02),
            (0.0, hl + 0.45 * (fringe - hl)),
            (-s * 0.55, fringe),
            (-s * 0.88, fringe + 0.08),
            (-s * xs, side),
        ]
        pts = chaikin(ctrl, 3)
        return pts if s > 0 else pts[::-1]
    if style == "long_sides":  # centre parting: the hairline peaks in the middle
        ctrl = [(xs, side), (0.7, hl + 0.25), (0.15, hl + 0.05), (0.0, hl - 0.05), (-0.15, hl + 0.05),
                (-0.7, hl + 0.25), (-xs, side)]
        return chaikin(ctrl, 3)
    # short_cap, spiky, bun, afro: a rounded hairline dropping at the temples
    pts = []
    for i in range(25):
        x = xs - 2.0 * xs * i / 24
        pts.append((x, hl + (side - hl) * math.pow(abs(x) / xs, 3.0)))
    return pts


def _draw_back_hair(layer: Layer, pose: Pose, idt: Identity, g: _Geometry, hair: RGB) -> None:
    H, v, style = g.H, idt.hair_volume, idt.hair_style
    if style == "long_sides":
        bottom = 0.55 * H + 0.8 * idt.hair_length
        top = _skull_arc(H, v + 0.06, 0.0)
        wide = 1.0 + v + 0.14
        pts = top + [(wide + 0.04, 0.5 * bottom), (wide - 0.05, bottom)]
        pts += arc(0.0, bottom, wide - 0.05, 0.12, 0.0, math.pi, 12)[1:-1]
        pts += [(-(wide - 0.05), bottom), (-(wide + 0.04), 0.5 * bottom)]
        layer.fill(pose.project_all(pts, Z_BACK_HAIR), shade(hair, 0.82))
    elif style == "afro":
        r, cy = 1.25 + 0.35 * idt.hair_length, -0.3 * H
        pts = []
        for i in range(72):
            t = 2.0 * math.pi * i / 72
            rr = r * (1.0 + 0.035 * math.cos(12.0 * t))  # bumpy curls
            pts.append((rr * math.cos(t), cy + rr * math.sin(t)))
        layer.fill(pose.project_all(pts, Z_BACK_HAIR), hair)
    elif style == "bun":
        r = 0.25 + 0.2 * idt.hair_length
        cy = -H * (1.0 + v) - 0.6 * r
        layer.fill(pose.project_all(ellipse(0.0, cy, r, 0.85 * r, 28), Z_BACK_HAIR), shade(hair, 0.92))
    elif style == "bald":  # a fringe of hair around the back of the head, visible at the temples
        for s in (-1.0, 1.0):
            layer.fill(pose.project_all(ellipse(s * 0.97, g.side_y + 0.05, 0.11, 0.24, 20), Z_BACK_HAIR),
                       shade(hair, 0.9))


def _draw_front_hair(layer: Layer, pose: Pose, idt: Identity, g: _Geometry, hair: RGB) -> None:
    style, H, v = idt.hair_style, g.H, idt.hair_volume
    if style == "bald":  # scalp shine instead of hair
        shine = ellipse(-0.25, -0.8 * H, 0.3, 0.12, 20, angle=-0.4)
        layer.fill(pose.project_all(shine, Z_HAIR), shade(idt.skin_rgb, 1.12), solid=False)
        return
    if style == "spiky":
        k = 5 + int(idt.hair_length * 4)
        length = 0.18 + 0.3 * idt.hair_length
        for i in range(k):
            phi = math.pi + 0.45 + (math.pi - 0.9) * (i + 0.5) / k
            half = 0.5 * (math.pi - 0.9) / k * 1.15
            a, b = _skull(H, v * 0.5, phi - half), _skull(H, v * 0.5, phi + half)
            tip = _skull(H, v + length, phi)
            layer.fill(pose.project_all([a, tip, b], Z_HAIR), hair)
    cap = _skull_arc(H, v, g.side_y) + _hairline(idt, g)
    layer.fill(pose.project_all(cap, Z_HAIR), hair)
    if style == "long_sides":  # strands framing the face, down to the mouth
        for s in (-1.0, 1.0):
            inner, outer = [], []
            for i in range(13):
                y = g.side_y + (g.mouth_y + 0.1 - g.side_y) * i / 12
                hw = half_width(idt, y)
                inner.append((s * (hw - 0.05), y))
                outer.append((s * (hw + 0.16 + v), y))
            layer.fill(pose.project_all(inner + outer[::-1], Z_HAIR), hair)
    # a highlight on the hair, where it bulges toward the camera
    hl = chaikin([(-0.55, g.hairline_y - 0.12), (-0.2, -H * (0.92 + v)), (0.25, -H * (0.95 + v))], 2)
    shine = shade(hair, 1.35) if sum(hair) < 600 else shade(hair, 0.85)  # light hair: a darker streak
    layer.fill(pose.project_all(stroke(hl, 0.025), Z_HAIR), shine, solid=False)


def _draw_ears(layer: Layer, pose: Pose, idt: Identity, g: _Geometry) -> None:
    if idt.hair_style in ("long_sides", "afro"):
        return  # covered by the hair
    y = 0.5 * (g.eye_y + g.nose_y)
    r = idt.ear_size
    for s in (-1.0, 1.0):
        hw = half_width(idt, y)
        ear = ellipse(s * (hw - 0.02), y, 0.55 * r, r, 24)
        layer.fill(pose.project_all(ear, Z_EAR), shade(idt.skin_rgb, 0.93))
        layer.fill(pose.project_all(ellipse(s * (hw + 0.08), y, 0.22 * r, 0.6 * r, 16), Z_EAR),
                   shade(idt.skin_rgb, 0.75), solid=False)


def _draw_eyes(layer: Layer, pose: Pose, idt: Identity, g: _Geometry, var: FaceVariation) -> list[Point]:
    """Both eyes and brows; returns the pupil centres in pixels, image-left first."""
    w = idt.eye_size
    h = w * idt.eye_open * var.eye_open
    centres = []
    for s in (-1.0, 1.0):
        cx, cy = s * idt.eye_spacing, g.eye_y
        upper = [
            (cx - w + 2 * w * i / 16, cy - h * math.pow(math.sin(math.pi * i / 16), 0.8)) for i in range(17)
        ]
        lower = [(cx + w - 2 * w * i / 16, cy + 0.85 * h * math.sin(math.pi * i / 16)) for i in range(17)]
        layer.fill(pose.project_all(upper + lower[1:-1], Z_EYE), SCLERA_RGB, solid=False)
        r_iris = min(0.78 * h, 0.6 * w)
        layer.fill(pose.project_all(ellipse(cx, cy, r_iris, r_iris, 24), Z_EYE), idt.eye_rgb, solid=False)
        layer.fill(pose.project_all(ellipse(cx, cy, 0.45 * r_iris, 0.45 * r_iris, 16), Z_EYE), PUPIL_RGB,
                   solid=False)
        glint = ellipse(cx + 0.4 * r_iris, cy - 0.4 * r_iris, 0.2 * r_iris, 0.2 * r_iris, 10)
        layer.fill(pose.project_all(glint, Z_EYE), (250, 250, 250), solid=False)
        lid = [(x, y - 0.01) for x, y in upper]
        widths = [0.012 + 0.018 * math.sin(math.pi * i / 16) for i in range(17)]
        layer.fill(pose.project_all(stroke(lid, widths), Z_EYE), LID_RGB, solid=False)
        centres.append(pose.project(cx, cy, Z_EYE))

        # Brow: from the inner end (u = 0) to the outer end (u = 1), thicker inside.
        raise_ = 0.05 * var.mouth_open
        base, top = [], []
        for i in range(13):
            u = i / 12
            x = s * (idt.eye_spacing - 0.85 * w + u * 2.0 * w)
            y = g.eye_y - idt.brow_gap - raise_
            y -= idt.brow_arch * 4.0 * u * (1.0 - u) + idt.brow_tilt * (u - 0.5)
            t = idt.brow_thickness * (1.0 - 0.45 * u)
            base.append((x, y))
            top.append((x, y - t))
        layer.fill(pose.project_all(base + top[::-1], Z_BROW), idt.brow_rgb, solid=False)
    return centres


def _draw_nose(layer: Layer, pose: Pose, idt: Identity, g: _Geometry) -> Point:
    """Nose ball, nostrils and a bridge shadow; returns the nose tip (ball centre) in pixels."""
    skin, nw, ty = idt.skin_rgb, idt.nose_width, g.nose_y
    # soft shadow under the nose, then the side of the bridge, nostrils, wings and the lit tip
    under = ellipse(0.0, ty + 0.055, 0.95 * nw, 0.055, 20)
    layer.fill(pose.project_all(under, Z_NOSE - 0.1), shade(skin, 0.86), solid=False)
    bridge = [(0.05, ty - 0.32), (0.085, ty - 0.18), (0.1, ty - 0.06)]
    bridge_poly = stroke(chaikin(bridge, 2), 0.013)
    layer.fill(pose.project_all(bridge_poly, Z_NOSE - 0.1), shade(skin, 0.86), solid=False)
    for s in (-1.0, 1.0):
        nostril = ellipse(s * 0.58 * nw, ty + 0.04, 0.3 * nw, 0.16 * nw, 14)
        layer.fill(pose.project_all(nostril, Z_NOSE - 0.08), shade(skin, 0.42), solid=False)
    wing = arc(0.0, ty - 0.005, 1.05 * nw, 0.085, 0.1, math.pi - 0.1, 14)
    layer.fill(pose.project_all(stroke(wing, 0.013), Z_NOSE - 0.05), shade(skin, 0.7), solid=False)
    r = 0.5 * nw
    layer.fill(pose.project_all(ellipse(0.0, ty, r, 0.85 * r, 20), Z_NOSE), shade(skin, 1.08), solid=False)
    return pose.project(0.0, ty, Z_NOSE)


def _draw_mouth(layer: Layer, pose: Pose, idt: Identity, g: _Geometry, var: FaceVariation) -> list[Point]:
    """Lips (closed or open); returns the mouth corners in pixels, image-left first."""
    n = 18
    mw, cy, my, lt = g.mouth_w, g.corner_y, g.mouth_y + 0.02 * var.smile, idt.lip_thickness
    opening = var.mouth_open * 2.2 * lt

    def line(i: int) -> Point:  # the parting line of the lips (a smile bends it down in the middle)
        u = i / n
        return -mw + 2.0 * mw * u, cy + (my - cy) * 4.0 * u * (1.0 - u)

    sin_u = [math.sin(math.pi * i / n) for i in range(n + 1)]
    mid = [line(i) for i in range(n + 1)]
    bow = [1.0 - 0.3 * math.exp(-(((i / n) - 0.5) / 0.08) ** 2) for i in range(n + 1)]  # cupid's bow
    upper_top = [(x, y - lt * math.pow(sin_u[i], 0.6) * bow[i]) for i, (x, y) in enumerate(mid)]
    upper_in = [(x, y - 0.25 * opening * sin_u[i]) for i, (x, y) in enumerate(mid)]
    lower_in = [(x, y + opening * sin_u[i]) for i, (x, y) in enumerate(mid)]
    lower_bot = [(x, y + 1.25 * lt * math.pow(sin_u[i], 0.8)) for i, (x, y) in enumerate(lower_in)]
    lip = idt.lip_rgb
    if opening > 0.0:
        layer.fill(pose.project_all(upper_in + lower_in[::-1], Z_MOUTH), MOUTH_INSIDE_RGB, solid=False)
        teeth = [(x, y + 0.4 * opening * sin_u[i]) for i, (x, y) in enumerate(upper_in)][3:-3]
        layer.fill(pose.project_all(upper_in[3:-3] + teeth[::-1], Z_MOUTH), TEETH_RGB, solid=False)
    layer.fill(pose.project_all(upper_top + upper_in[::-1], Z_MOUTH), shade(lip, 0.9), solid=False)
    layer.fill(pose.project_all(lower_in + lower_bot[::-1], Z_MOUTH), lip, solid=False)
    if opening == 0.0:
        layer.fill(pose.project_all(stroke(mid, 0.011), Z_MOUTH), shade(lip, 0.45), solid=False)
    return [pose.project(*mid[0], Z_MOUTH), pose.project(*mid[-1], Z_MOUTH)]


def _draw_mark_under(layer: Layer, pose: Pose, idt: Identity, g: _Geometry, hair: RGB) -> None:
    """Marks that features are drawn over: freckles, mole, beard, mustache."""
    if idt.mark == "freckles":
        for x, y in idt.mark_points:
            dot = ellipse(x, y, 0.022, 0.02, 8)
            layer.fill(pose.project_all(dot, Z_EYE), shade(idt.skin_rgb, 0.72), solid=False)
    elif idt.mark == "mole":
        x, y = idt.mark_points[0]
        mole = ellipse(x, y, 0.035, 0.033, 12)
        layer.fill(pose.project_all(mole, Z_EYE), shade(idt.skin_rgb, 0.38), solid=False)
    if idt.mark == "beard":
        H, mw, lt = g.H, g.mouth_w, idt.lip_thickness
        start = g.nose_y - 0.05
        lower = [(x * 1.03, y * 1.03 + 0.02) for x, y in outline(idt, 96) if y >= start]
        lower.sort(key=lambda p: -p[0])  # right cheek -> chin -> left cheek
        hw = half_width(idt, start)
        chin_y = g.mouth_y + 1.6 * lt + 0.08  # the beard leaves the mouth and a little around it bare
        inner = chaikin(
            [
                (-0.85 * hw, start),
                (-(mw + 0.13), g.mouth_y - 0.03),
                (-0.55 * mw, chin_y),
                (0.0, chin_y + 0.02 - 0.1 * lt),
                (0.55 * mw, chin_y),
                (mw + 0.13, g.mouth_y - 0.03),
                (0.85 * hw, start),
            ],
            2,
        )
        layer.fill(pose.project_all(lower + inner, Z_MOUTH - 0.15), shade(hair, 0.9))
    if idt.mark in ("beard", "mustache"):
        mw, top, bot = g.mouth_w, g.nose_y + 0.085, g.corner_y - 0.6 * idt.lip_thickness
        upper = [(-1.05 * mw + 2.1 * mw * i / 12, top + 0.03 * (2 * i / 12 - 1) ** 2) for i in range(13)]
        lower = [(1.1 * mw - 2.2 * mw * i / 12, bot + 0.02 * (1 - (2 * i / 12 - 1) ** 2)) for i in range(13)]
        moustache = upper + [(1.15 * mw, bot + 0.06)] + lower + [(-1.15 * mw, bot + 0.06)]
        layer.fill(pose.project_all(moustache, Z_MOUTH + 0.02), shade(hair, 0.85), solid=False)


def _draw_glasses(layer: Layer, pose: Pose, idt: Identity, g: _Geometry) -> None:
    w, frame = idt.eye_size, idt.accent_rgb
    rx, ry, t = 1.5 * w, 1.15 * w, 0.028
    for s in (-1.0, 1.0):
        cx = s * idt.eye_spacing
        outer = pose.project_all(ellipse(cx, g.eye_y + 0.01, rx + t, ry + t, 32), Z_GLASSES)
        inner = pose.project_all(ellipse(cx, g.eye_y + 0.01, rx - t, ry - t, 32), Z_GLASSES)
        layer.fill(outer, frame, solid=False, holes=[inner])
        hw = half_width(idt, g.eye_y)
        temple = [(s * (idt.eye_spacing + rx), g.eye_y - 0.02), (s * (hw + 0.02), g.eye_y - 0.05)]
        layer.fill(pose.project_all(stroke(temple, t), Z_GLASSES - 0.2), frame)
    gap = idt.eye_spacing - rx
    bridge = [(-gap - 0.01, g.eye_y - 0.02), (0.0, g.eye_y - 0.06), (gap + 0.01, g.eye_y - 0.02)]
    layer.fill(pose.project_all(stroke(bridge, t), Z_GLASSES), frame, solid=False)


def face_box(idt: Identity, pose: Pose, g: _Geometry) -> np.ndarray:
    """(4,) float32 x1, y1, x2, y2: the module's box rule under `pose`."""
    top = max(g.eye_y - (g.mouth_y - g.eye_y), -0.98 * g.H)
    pts = [p for p in outline(idt, 144) if p[1] >= top]
    hw = half_width(idt, top)
    pts += [(-hw, top), (hw, top)]
    px = pose.project_all(pts, 0.0)
    xs, ys = [p[0] for p in px], [p[1] for p in px]
    return np.array([min(xs), min(ys), max(xs), max(ys)], dtype=np.float32)


def _light(rgb: np.ndarray, var: FaceVariation) -> np.ndarray:
    """Brightness/contrast/colour cast on float32 RGB (any shape (..., 3)); basic arithmetic only."""
    out = (rgb - np.float32(128.0)) * np.float32(var.contrast) + np.float32(128.0 + var.brightness)
    return out * np.asarray(var.cast, dtype=np.float32)


def _shade_and_light(layer: Layer, pose: Pose, var: FaceVariation, face_outline: list[Point]) -> np.ndarray:
    """Roundness, a light gradient and the light's brightness/contrast/colour on a drawn layer.

    Returns (S, S, 4) uint8 straight RGBA. Works on the silhouette's bounding box only (the rest stays
    transparent); float32 elementwise arithmetic only, so results are the same on every CPU.
    """
    size = layer.alpha.shape[0]
    rows, cols = np.flatnonzero(layer.alpha.any(axis=1)), np.flatnonzero(layer.alpha.any(axis=0))
    rgba = np.zeros((size, size, 4), np.uint8)
    if rows.size == 0:
        return rgba
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    rgb = layer.rgb[y0:y1, x0:x1].astype(np.float32)
    lx, ly = math.cos(math.radians(var.light_deg)), math.sin(math.radians(var.light_deg))
    if var.relief > 0.0:
        # Roundness: a blurred, shrunken copy of the head lit from the light's side; darker outside it.
        # Blurred at quarter resolution and resized back: the shading is soft, and big kernels are slow.
        small = max(8, -(-size // 4))
        q = size / small
        cx, cy = (pose.cx + 0.5) / q - 0.5, (pose.cy + 0.5) / q - 0.5
        small_pose = Pose(cx, cy, pose.unit / q, pose.roll, pose.yaw, pose.pitch)
        lit = np.zeros((small, small), np.uint8)
        core = [(0.8 * x + 0.2 * lx, 0.8 * y + 0.2 * ly) for x, y in face_outline]
        fill(lit, small_pose.project_all(core, 0.0), 255)
        sigma = max(0.5, 0.3 * pose.unit / q)
        lit = cv2.GaussianBlur(lit, (0, 0), sigmaX=sigma, sigmaY=sigma)
        lit = cv2.resize(lit, (size, size), interpolation=cv2.INTER_LINEAR)[y0:y1, x0:x1]
        lit_f = lit.astype(np.float32)[..., None]
        rgb *= np.float32(1.0 - var.relief) + np.float32(var.relief / 255.0) * lit_f
    if var.gradient > 0.0:
        k = var.gradient / (1.5 * pose.unit)
        xs = (np.arange(x0, x1, dtype=np.float32) - np.float32(pose.cx)) * np.float32(lx * k)
        ys = (np.arange(y0, y1, dtype=np.float32) - np.float32(pose.cy)) * np.float32(ly * k)
        rgb *= np.maximum(np.float32(1.0) + xs[None, :] + ys[:, None], np.float32(0.3))[..., None]
    crop = Layer(y1 - y0, x1 - x0)
    crop.rgb = np.clip(rgb + np.float32(0.5), 0, 255).astype(np.uint8)
    crop.alpha = layer.alpha[y0:y1, x0:x1]
    out = crop.to_rgba()
    straight = _light(out[..., :3].astype(np.float32), var)
    out[..., :3] = np.where(out[..., 3:] > 0, np.clip(straight + np.float32(0.5), 0, 255), 0).astype(np.uint8)
    rgba[y0:y1, x0:x1] = out
    return rgba


def draw_face(identity: Identity, variation: FaceVariation, size: int) -> FacePatch:
    """Render `identity` under `variation` into a size x size transparent patch (size >= 32 px)."""
    if size < 32:
        raise ValueError(f"face patch size must be >= 32 px, got {size}")
    idt, var = identity, variation
    g = _geometry(idt, var)
    unit = size * UNIT_FRACTION * var.scale
    centre = (size - 1) / 2.0
    pose = Pose(
        cx=centre + var.shift[0] * size,
        cy=centre + var.shift[1] * size,
        unit=unit,
        roll=math.radians(var.roll_deg),
        yaw=math.radians(var.yaw_deg),
        pitch=math.radians(var.pitch_deg),
    )
    hair = idt.hair_rgb
    layer = Layer(size, size)
    _draw_back_hair(layer, pose, idt, g, hair)
    _draw_ears(layer, pose, idt, g)
    face_outline = outline(idt)
    layer.fill(pose.project_all(face_outline, 0.0), idt.skin_rgb)
    _draw_mark_under(layer, pose, idt, g, hair)
    nose = _draw_nose(layer, pose, idt, g)
    mouth = _draw_mouth(layer, pose, idt, g, var)
    eyes = _draw_eyes(layer, pose, idt, g, var)
    _draw_front_hair(layer, pose, idt, g, hair)
    if idt.mark == "glasses":
        _draw_glasses(layer, pose, idt, g)

    rgba = _shade_and_light(layer, pose, var, face_outline)

    neck = _light(np.asarray(shade(idt.skin_rgb, 0.8), dtype=np.float32), var)
    neck_rgb = tuple(int(v) for v in np.clip(neck + np.float32(0.5), 0, 255).astype(np.uint8))
    landmarks = np.array([eyes[0], eyes[1], nose, mouth[0], mouth[1]], dtype=np.float32)
    return FacePatch(
        rgba=rgba,
        landmarks=landmarks,
        box=face_box(idt, pose, g),
        chin=pose.project(0.0, g.H, 0.0),
        unit=unit,
        neck_rgb=neck_rgb,  # type: ignore[arg-type]
    )
