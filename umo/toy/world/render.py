"""Render toy-world images: single faces, multi-person scenes and reference portraits.

Scene recipe: a setting's background (clutter + non-face distractors) -> one body (neck, shoulders) per
person -> the face patches (`umo.toy.world.face`), placed so that no face box is covered by another person's
head or hair and people are separated left to right -> a global tone change, slight blur and pixel noise.
Ground truth (boxes per the box rule in `umo.toy.world.face`, 5 landmarks, identity ids) is carried through
exactly: patches are pasted at integer offsets, so scene landmarks are patch landmarks plus the offset.

Everything is drawn from the caller's `np.random.Generator`, in a fixed order: the same generator state
gives the same image bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import cv2
import numpy as np

from umo.toy.world.background import SCENE_SETTINGS, SETTINGS, render_background, vertical_gradient
from umo.toy.world.caption import make_caption
from umo.toy.world.draw import RGB, composite, fill, shade
from umo.toy.world.face import UNIT_FRACTION, FacePatch, FaceVariation, draw_face, sample_variation
from umo.toy.world.identity import Identity, person_name

# Target face-box widths in px on a 256 px canvas (scaled with the canvas), by number of people: crowds
# are smaller so that they fit without covering each other.
FACE_WIDTHS: dict[int, tuple[float, float]] = {
    1: (56.0, 110.0),
    2: (46.0, 96.0),
    3: (42.0, 78.0),
    4: (40.0, 64.0),
}
MAX_FACES = 4
_PLACEMENT_TRIES = 80
_MARGIN = 2  # px kept between a face box and anything of another person's head


@dataclass(frozen=True)
class Scene:
    """One rendered image and its ground truth, faces ordered LEFT TO RIGHT (by box centre x).

    image:        (H, W, 3) uint8 RGB.
    boxes:        (K, 4) float32 x1, y1, x2, y2 pixels (box rule: `umo.toy.world.face`).
    landmarks:    (K, 5, 2) float32 pixels, insightface order (left eye, right eye, nose, mouth L, mouth R).
    identity_ids: (K,) int64.
    caption:      names the K people left to right, plus the setting.
    setting:      the setting phrase used ('in a park').
    """

    image: np.ndarray
    boxes: np.ndarray
    landmarks: np.ndarray
    identity_ids: np.ndarray
    caption: str
    setting: str


def render_face(identity: Identity, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One face with a random pose, lighting and expression drawn from `rng`.

    Returns (rgba (size, size, 4) uint8 straight alpha, transparent background;
             landmarks (5, 2) float32 patch pixels, insightface order).
    """
    patch = draw_face(identity, sample_variation(rng), size)
    return patch.rgba, patch.landmarks


def _patch_size(target_width: float) -> int:
    """Patch side whose nominal face box (2 canonical units) is `target_width` px wide."""
    return max(32, int(round(target_width / (2.0 * UNIT_FRACTION))))


def _silhouette(rgba: np.ndarray) -> tuple[int, int, int, int]:
    """Tight x1, y1, x2, y2 (inclusive pixels) of the patch's non-transparent part."""
    alpha = rgba[..., 3]
    cols, rows = np.flatnonzero(alpha.any(axis=0)), np.flatnonzero(alpha.any(axis=1))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def _overlaps(a: Sequence[float], b: Sequence[float], margin: float) -> bool:
    return not (a[2] + margin < b[0] or b[2] + margin < a[0] or a[3] + margin < b[1] or b[3] + margin < a[1])


def _shifted(box: Sequence[float], dx: int, dy: int) -> tuple[float, float, float, float]:
    return box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy


def _place(
    patches: list[FacePatch], height: int, width: int, rng: np.random.Generator
) -> list[tuple[int, int]] | None:
    """Integer offsets putting every face box inside the canvas, no face box under another person's head,
    and face centres apart left to right by half a face width; None if random search fails."""
    placed: list[tuple[int, int]] = []
    sils = [_silhouette(p.rgba) for p in patches]
    for k, patch in enumerate(patches):
        x1, y1, x2, y2 = (float(v) for v in patch.box)
        lo_x, hi_x = math.ceil(1 - x1), math.floor(width - 2 - x2)
        lo_y, hi_y = math.ceil(1 - y1), math.floor(height - 2 - y2)
        if lo_x > hi_x or lo_y > hi_y:
            return None
        for _ in range(_PLACEMENT_TRIES):
            dx, dy = int(rng.integers(lo_x, hi_x + 1)), int(rng.integers(lo_y, hi_y + 1))
            box_k, sil_k = _shifted(patch.box, dx, dy), _shifted(sils[k], dx, dy)
            ok = True
            for j, (ox, oy) in enumerate(placed):
                box_j, sil_j = _shifted(patches[j].box, ox, oy), _shifted(sils[j], ox, oy)
                min_sep = 0.25 * ((box_k[2] - box_k[0]) + (box_j[2] - box_j[0]))
                if (
                    _overlaps(box_k, sil_j, _MARGIN)
                    or _overlaps(sil_k, box_j, _MARGIN)
                    or abs((box_k[0] + box_k[2]) - (box_j[0] + box_j[2])) / 2 < min_sep
                ):
                    ok = False
                    break
            if ok:
                placed.append((dx, dy))
                break
        else:
            return None
    return placed


def _draw_body(canvas: np.ndarray, patch: FacePatch, dx: int, dy: int, clothes: RGB) -> None:
    """Neck and shoulders under a face pasted at (dx, dy); drawn before any head, so heads cover bodies."""
    cx, cy = patch.chin[0] + dx, patch.chin[1] + dy
    u = patch.unit
    bottom = max(cy + 4.0 * u, float(canvas.shape[0] + 2))
    neck = [(cx - 0.34 * u, cy - 0.5 * u), (cx + 0.34 * u, cy - 0.5 * u), (cx + 0.32 * u, cy + 0.55 * u),
            (cx - 0.32 * u, cy + 0.55 * u)]
    fill(canvas, neck, patch.neck_rgb)
    shoulders = [(cx - 0.5 * u, cy + 0.4 * u), (cx - 1.45 * u, cy + 0.7 * u), (cx - 1.85 * u, cy + 1.2 * u),
                 (cx - 2.0 * u, bottom), (cx + 2.0 * u, bottom), (cx + 1.85 * u, cy + 1.2 * u),
                 (cx + 1.45 * u, cy + 0.7 * u), (cx + 0.5 * u, cy + 0.4 * u), (cx, cy + 0.95 * u)]
    fill(canvas, shoulders, clothes)
    fill(canvas, [(cx - 0.5 * u, cy + 0.4 * u), (cx - 0.35 * u, cy + 0.75 * u), (cx, cy + 0.95 * u)],
         shade(clothes, 0.75))


def _finish(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Whole-image camera effects: tone, optional slight blur, integer pixel noise."""
    contrast, brightness = float(rng.uniform(0.88, 1.12)), float(rng.uniform(-15.0, 15.0))
    out = (image.astype(np.float32) - np.float32(128.0)) * np.float32(contrast)
    out += np.float32(128.0 + brightness)
    out = np.clip(out + np.float32(0.5), 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        sigma = float(rng.uniform(0.3, 0.9))
        out = cv2.GaussianBlur(out, (0, 0), sigmaX=sigma, sigmaY=sigma)
    amp = int(rng.integers(0, 5))
    if amp:
        noise = rng.integers(-amp, amp + 1, size=out.shape, dtype=np.int16)
        out = np.clip(out.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return out


def _compose(
    patches: list[FacePatch],
    offsets: list[tuple[int, int]],
    ids: list[int],
    background: np.ndarray,
    rng: np.random.Generator,
    caption_for: Callable[[list[int]], str],
    setting: str,
) -> Scene:
    canvas = background.copy()
    clothes = [tuple(int(c) for c in rng.integers(20, 236, 3)) for _ in patches]
    # Smaller people stand farther back: draw them first, so nearer bodies and heads overlap theirs.
    depth = sorted(range(len(patches)), key=lambda i: (patches[i].unit, i))
    for i in depth:
        _draw_body(canvas, patches[i], *offsets[i], clothes[i])  # type: ignore[arg-type]
    for i in depth:
        composite(canvas, patches[i].rgba, *offsets[i])
    image = _finish(canvas, rng)
    boxes = np.stack([np.asarray(_shifted(p.box, *off), np.float32) for p, off in zip(patches, offsets)])
    lmk = np.stack([p.landmarks + np.array([dx, dy], np.float32) for p, (dx, dy) in zip(patches, offsets)])
    order = np.argsort((boxes[:, 0] + boxes[:, 2]) / 2, kind="stable")
    ordered_ids = [ids[i] for i in order]
    return Scene(
        image=image,
        boxes=boxes[order],
        landmarks=lmk[order].astype(np.float32),
        identity_ids=np.asarray(ordered_ids, dtype=np.int64),
        caption=caption_for(ordered_ids),
        setting=setting,
    )


def _check_people(world_seed: int, identities: list[Identity], what: str, *, repeats: bool = False) -> int:
    """The number of people of a scene or group, after checking: 1..MAX_FACES, distinct (unless `repeats`), all
    of this world."""
    k = len(identities)
    if not 1 <= k <= MAX_FACES:
        raise ValueError(f"a {what} holds 1..{MAX_FACES} identities, got {k}")
    if not repeats and len({i.identity_id for i in identities}) != k:
        got = [i.identity_id for i in identities]
        raise ValueError(f"identities in a {what} must be distinct, got ids {got}")
    for idt in identities:
        if idt.world_seed != world_seed:
            raise ValueError(
                f"{person_name(idt.identity_id)} belongs to world {idt.world_seed}, not {world_seed}"
            )
    return k


def render_scene(
    world_seed: int,
    identities: list[Identity],
    rng: np.random.Generator,
    size: tuple[int, int] = (256, 256),
    *,
    setting: str | None = None,
) -> Scene:
    """A scene of 1..4 `identities` (all from world `world_seed`), each once, left-to-right order random.

    size: (height, width) px, each >= 128. setting: a key of `background.SCENE_SETTINGS`; None draws one.
    Face boxes are 40..110 px wide on a 256 px canvas (smaller the more people), never covered by another
    person's head, and lie inside the image; landmarks lie inside their boxes.
    """
    k = _check_people(world_seed, identities, "scene")
    height, width = size
    if min(height, width) < 128:
        raise ValueError(f"scene size must be >= 128 px per side, got {size}")
    if setting is None:
        setting = SCENE_SETTINGS[int(rng.integers(0, len(SCENE_SETTINGS)))]
    background = render_background(rng, height, width, setting)

    order = [int(i) for i in rng.permutation(k)]
    people = [identities[i] for i in order]
    lo, hi = FACE_WIDTHS[k]
    scale = min(height, width) / 256.0
    # face-box widths, largest first: the big ones are the hardest to place
    targets = sorted((float(rng.uniform(lo, hi)) * scale for _ in range(k)), reverse=True)
    variations = [sample_variation(rng) for _ in range(k)]
    for _attempt in range(12):
        patches = [draw_face(p, v, _patch_size(t)) for p, v, t in zip(people, variations, targets)]
        offsets = _place(patches, height, width, rng)
        if offsets is not None:
            break
        targets = [t * 0.88 for t in targets]  # crowded: everyone a little smaller, then try again
    else:
        raise RuntimeError(f"could not place {k} faces on a {width}x{height} canvas")
    return _compose(
        patches, offsets, [p.identity_id for p in people], background, rng,
        lambda ids: make_caption(ids, setting, rng), setting,
    )


def render_portrait(
    identity: Identity, rng: np.random.Generator, size: tuple[int, int] = (256, 256)
) -> Scene:
    """A reference portrait: one face, large (box ~40-50% of the width), near the centre, on a plain
    studio backdrop; mild pose and lighting. size: (height, width) px, each >= 128."""
    height, width = size
    if min(height, width) < 128:
        raise ValueError(f"portrait size must be >= 128 px per side, got {size}")
    setting = "in a studio"
    background = render_background(rng, height, width, setting)
    v = sample_variation(rng)
    # References are cleaner than scenes: half the pose and lighting swings.
    var = FaceVariation(
        roll_deg=v.roll_deg / 2, yaw_deg=v.yaw_deg / 2, pitch_deg=v.pitch_deg / 2, scale=v.scale,
        shift=(0.0, 0.0), brightness=v.brightness / 2, contrast=1.0 + (v.contrast - 1.0) / 2, cast=v.cast,
        light_deg=v.light_deg, gradient=v.gradient / 2, relief=v.relief, mouth_open=v.mouth_open,
        smile=v.smile, eye_open=max(v.eye_open, 0.9),
    )
    target = float(rng.uniform(0.4, 0.5)) * width
    patch = draw_face(identity, var, _patch_size(target))
    x1, y1, x2, y2 = (float(c) for c in patch.box)
    dx = int(round((width - 1) / 2 - (x1 + x2) / 2 + float(rng.uniform(-0.04, 0.04)) * width))
    dy = int(round(0.46 * height - (y1 + y2) / 2 + float(rng.uniform(-0.03, 0.03)) * height))
    # keep the box inside the frame even for tall faces on small canvases
    dx = min(max(dx, math.ceil(1 - x1)), math.floor(width - 2 - x2))
    dy = min(max(dy, math.ceil(1 - y1)), math.floor(height - 2 - y2))
    return _compose(
        [patch], [(dx, dy)], [identity.identity_id], background, rng,
        lambda ids: f"A portrait of {person_name(ids[0])}", setting,
    )


def render_group(
    world_seed: int, identities: list[Identity], rng: np.random.Generator, size: int = 192, *,
    shuffle: bool = True, repeats: bool = False,
) -> Scene:
    """A group photo: 1..4 `identities` side by side in a row, heads at about the same height, on a plain
    studio backdrop (no clutter), left-to-right order random (shuffle=False: in the given order, person k in
    slot k). repeats=True lets one person stand in two places (the confused photos of `umo.toy.cast`). The generator ablation's targets
    (`umo.toy.base`): the same people and faces as `render_scene`, in a layout a tiny generator can
    learn on a CPU in minutes, so that what it gets wrong is WHO stands where, not where anyone stands.

    size: the square canvas side, >= 128 px. Face boxes are 36% of the side for 1-2 people, 27% for 3 and 20%
    for 4, with a few percent of jitter in position and size; pose, lighting and expression vary as in every
    scene.
    """
    k = _check_people(world_seed, identities, "group", repeats=repeats)
    if size < 128:
        raise ValueError(f"group size must be >= 128 px, got {size}")
    setting = "in a studio"
    pal = SETTINGS[setting]
    top, bottom = shade(pal.upper, float(rng.uniform(0.9, 1.1))), shade(pal.lower, float(rng.uniform(0.9, 1.1)))
    background = np.clip(vertical_gradient(top, bottom, size, size) + np.float32(0.5), 0, 255).astype(np.uint8)

    people = [identities[i] for i in (rng.permutation(k) if shuffle else range(k))]
    face_w = size * {1: 0.36, 2: 0.36, 3: 0.27, 4: 0.2}[k]
    patches, offsets = [], []
    for slot, person in enumerate(people):
        var = replace(sample_variation(rng), shift=(0.0, 0.0), scale=1.0)
        patch = draw_face(person, var, _patch_size(face_w * float(rng.uniform(0.95, 1.05))))
        x1, y1, x2, y2 = (float(c) for c in patch.box)
        cx = (slot + 0.5) * size / k + float(rng.uniform(-0.03, 0.03)) * size
        cy = 0.4 * size + float(rng.uniform(-0.04, 0.04)) * size
        dx = min(max(int(round(cx - (x1 + x2) / 2)), math.ceil(1 - x1)), math.floor(size - 2 - x2))
        dy = min(max(int(round(cy - (y1 + y2) / 2)), math.ceil(1 - y1)), math.floor(size - 2 - y2))
        patches.append(patch)
        offsets.append((dx, dy))
    words = {1: "one person", 2: "two people", 3: "three people", 4: "four people"}
    return _compose(patches, offsets, [p.identity_id for p in people], background, rng,
                    lambda ids: f"a group photo of {words[k]}", setting)


def head_strip(scene: Scene, rows: int) -> Scene:
    """The `rows` rows of a group photo around its heads (which stand at 0.4 of the height), truth moved with
    them: a wide strip holds the same faces in fewer pixels than the square (the toy base's photos)."""
    h = scene.image.shape[0]
    if not 0 < rows <= h:
        raise ValueError(f"strip rows must be in (0, {h}], got {rows}")
    top = min(max(int(round(0.4 * h - rows / 2)), 0), h - rows)
    shift = np.array([0, top], np.float32)
    return replace(scene, image=np.ascontiguousarray(scene.image[top:top + rows]),
                   boxes=scene.boxes - np.tile(shift, 2), landmarks=scene.landmarks - shift)
