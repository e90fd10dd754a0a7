"""Toy world part 1: identities, faces, scenes and the raw collection (all CPU, a few seconds)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from umo.faces.align import ARCFACE_TEMPLATE, similarity_transforms
from umo.toy.world.caption import caption_ids
from umo.toy.world.collection import (
    CAPTIONS_FILE,
    METADATA_FILE,
    default_truth_path,
    load_truth,
    plan_collection,
    write_raw_collection,
)
from umo.toy.world.draw import shade
from umo.toy.world.face import PUPIL_RGB, UNIT_FRACTION, FaceVariation, draw_face, sample_variation
from umo.toy.world.identity import (
    HAIR_STYLES,
    MARKS,
    MAX_IDENTITIES,
    MIN_TRAIT_DISTANCE,
    RANGES,
    make_identity,
    pairwise_trait_distances,
    trait_distance,
)
from umo.toy.world.preview import contact_sheet
from umo.toy.world.preview import main as preview_main
from umo.toy.world.render import render_face, render_portrait, render_scene


def _colour_dist(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _px(img: np.ndarray, xy) -> np.ndarray:
    x, y = (int(round(float(v))) for v in xy)
    return img[y, x]


# ---------------------------------------------------------------- faces: landmarks lie where they are drawn


@pytest.mark.parametrize("identity_id", range(12))
def test_landmarks_are_drawn_features_in_a_neutral_render(identity_id):
    idt = make_identity(0, identity_id)
    size = 512
    patch = draw_face(idt, FaceVariation.neutral(), size)
    rgba, lmk = patch.rgba, patch.landmarks
    unit = size * UNIT_FRACTION
    r_iris = min(0.78 * idt.eye_size * idt.eye_open, 0.6 * idt.eye_size) * unit
    for eye in lmk[:2]:
        assert _px(rgba, eye)[3] == 255
        assert _colour_dist(_px(rgba, eye)[:3], PUPIL_RGB) <= 12, "the eye landmark is the pupil centre"
        ring = [_px(rgba, (eye[0] + dx * 0.72 * r_iris, eye[1] + dy * 0.72 * r_iris))[:3]
                for dx, dy in ((-1, 0), (1, 0), (0, 1), (-0.7, 0.7))]  # the glint is up-right: not there
        assert min(_colour_dist(c, idt.eye_rgb) for c in ring) <= 12, "an iris of the identity's eye colour"
    assert _colour_dist(_px(rgba, lmk[2])[:3], shade(idt.skin_rgb, 1.08)) <= 8, "nose landmark: the tip ball"
    lips = [idt.lip_rgb, shade(idt.lip_rgb, 0.9), shade(idt.lip_rgb, 0.45)]
    for corner, outward in ((lmk[3], -1.0), (lmk[4], 1.0)):
        x, y = int(round(float(corner[0]))), int(round(float(corner[1])))
        near = rgba[y - 2 : y + 3, x - 2 : x + 3, :3].reshape(-1, 3)
        assert min(_colour_dist(p, c) for p in near for c in lips) <= 30, "a lip pixel at the mouth corner"
        if idt.mark not in ("beard", "mustache"):
            beyond = _px(rgba, (corner[0] + outward * 4, corner[1]))[:3]
            assert _colour_dist(beyond, idt.skin_rgb) <= 12, "just past the corner is plain skin"
    # Left/right in the image, insightface order, and a usable alignment.
    assert lmk[0, 0] < lmk[1, 0] and lmk[3, 0] < lmk[4, 0]
    _, valid = similarity_transforms(lmk[None], image_hw=(size, size))
    assert valid.all()


def test_aligned_crops_keep_the_pupils_at_the_eye_landmarks():
    """End to end with random pose and lighting: warp each face to the ArcFace 112x112 template with its own
    landmarks; the warped eye landmarks land on dark pupil pixels (the landmarks follow the drawing
    through any pose), and the fit to the template is close (toy faces have ArcFace-like proportions)."""
    rng = np.random.default_rng(3)
    for i in range(16):
        idt = make_identity(0, 100 + i)
        var = sample_variation(rng)
        patch = draw_face(idt, var, 224)
        m, valid = similarity_transforms(patch.landmarks[None], image_hw=(224, 224))
        assert valid.all()
        rgb = np.ascontiguousarray(patch.rgba[..., :3])
        crop = cv2.warpAffine(rgb, m[0], (112, 112), flags=cv2.INTER_LINEAR)
        luma = crop.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        warped = patch.landmarks.astype(np.float64) @ m[0, :, :2].T + m[0, :, 2]
        for ex, ey in warped[:2]:
            x, y = int(round(ex)), int(round(ey))
            assert luma[y - 1 : y + 2, x - 1 : x + 2].min() < 100, f"id {100 + i}: no pupil at the eye"
        rms = float(np.sqrt(((warped - ARCFACE_TEMPLATE) ** 2).sum(axis=1).mean()))
        assert rms < 8.0, f"id {100 + i}: landmarks {rms:.1f} px RMS from the template after alignment"
        assert patch.box[0] <= patch.landmarks[:, 0].min() and patch.landmarks[:, 0].max() <= patch.box[2]
        assert patch.box[1] <= patch.landmarks[:, 1].min() and patch.landmarks[:, 1].max() <= patch.box[3]


def test_render_face_api_and_transparency():
    rgba, lmk = render_face(make_identity(0, 7), np.random.default_rng(0), 160)
    assert rgba.shape == (160, 160, 4) and rgba.dtype == np.uint8
    assert lmk.shape == (5, 2) and lmk.dtype == np.float32
    assert rgba[0, 0, 3] == 0 and rgba[-1, -1, 3] == 0, "transparent background around the head"
    assert (rgba[..., 3] == 255).mean() > 0.1
    again, _ = render_face(make_identity(0, 7), np.random.default_rng(0), 160)
    assert np.array_equal(rgba, again)


# ---------------------------------------------------------------- identities: stable and distinct


def test_identities_are_stable_and_in_range():
    a = make_identity(0, 42)
    assert a == make_identity(0, 42)
    assert a != make_identity(1, 42), "another world has other people under the same id"
    assert a.hair_style in HAIR_STYLES and a.mark in MARKS
    for name, (lo, hi) in RANGES.items():
        assert lo <= getattr(a, name) <= hi, name
    assert a.name == "toy person 0042"
    with pytest.raises(ValueError, match="identity_id"):
        make_identity(0, MAX_IDENTITIES)


def test_a_world_of_500_identities_is_distinct():
    people = [make_identity(0, i) for i in range(500)]
    d = pairwise_trait_distances(people)
    np.fill_diagonal(d, np.inf)
    assert d.min() >= MIN_TRAIT_DISTANCE
    assert d.min() > 1.5, "in practice the closest pair is far above the enforced minimum"
    assert d[3, 77] == pytest.approx(trait_distance(people[3], people[77]))
    combos = {(p.hair_style, p.mark, p.hair_tone, p.skin_tone) for p in people}
    assert len(combos) == 500, "categorical traits are a bijection of the id"
    assert {p.hair_style for p in people} == set(HAIR_STYLES) and {p.mark for p in people} == set(MARKS)


# ---------------------------------------------------------------- scenes


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_scene_ground_truth(k):
    for seed in range(4):
        rng = np.random.default_rng((k, seed))
        ids = [int(v) for v in rng.choice(500, size=k, replace=False)]
        scene = render_scene(0, [make_identity(0, i) for i in ids], rng)
        h, w = scene.image.shape[:2]
        assert scene.image.shape == (256, 256, 3) and scene.image.dtype == np.uint8
        assert scene.boxes.shape == (k, 4) and scene.landmarks.shape == (k, 5, 2)
        assert len(scene.identity_ids) == k
        assert sorted(scene.identity_ids.tolist()) == sorted(ids)
        b, lmk = scene.boxes, scene.landmarks
        assert (b[:, :2] >= 0).all() and (b[:, 2] <= w - 1).all() and (b[:, 3] <= h - 1).all()
        assert (lmk[..., 0] >= b[:, None, 0]).all() and (lmk[..., 0] <= b[:, None, 2]).all()
        assert (lmk[..., 1] >= b[:, None, 1]).all() and (lmk[..., 1] <= b[:, None, 3]).all()
        widths = b[:, 2] - b[:, 0]
        assert (widths >= 25).all() and (widths <= 125).all()
        centres = (b[:, 0] + b[:, 2]) / 2
        assert (np.diff(centres) > 0).all(), "faces are ordered left to right"
        assert caption_ids(scene.caption) == scene.identity_ids.tolist(), scene.caption
        assert scene.setting in scene.caption
        for i in range(k):  # no two face boxes overlap
            for j in range(i + 1, k):
                assert b[i, 2] < b[j, 0] or b[j, 2] < b[i, 0] or b[i, 3] < b[j, 1] or b[j, 3] < b[i, 1]
        _, valid = similarity_transforms(lmk, image_hw=(h, w))
        assert valid.all()


def test_scenes_are_deterministic_and_vary():
    people = [make_identity(0, 5), make_identity(0, 9)]
    a = render_scene(0, people, np.random.default_rng(11))
    b = render_scene(0, people, np.random.default_rng(11))
    c = render_scene(0, people, np.random.default_rng(12))
    assert a.image.tobytes() == b.image.tobytes() and a.caption == b.caption
    assert np.array_equal(a.landmarks, b.landmarks)
    assert a.image.tobytes() != c.image.tobytes()


def test_scene_rejects_bad_casts():
    with pytest.raises(ValueError, match="1..4"):
        render_scene(0, [make_identity(0, i) for i in range(5)], np.random.default_rng(0))
    with pytest.raises(ValueError, match="world"):
        render_scene(0, [make_identity(1, 3)], np.random.default_rng(0))


def test_portrait_is_one_large_centred_face():
    scene = render_portrait(make_identity(0, 21), np.random.default_rng(0))
    assert scene.identity_ids.tolist() == [21] and caption_ids(scene.caption) == [21]
    x1, y1, x2, y2 = scene.boxes[0]
    assert x2 - x1 > 0.33 * 256 and 0.3 * 256 < (x1 + x2) / 2 < 0.7 * 256


def test_contact_sheet(tmp_path):
    sheet = contact_sheet([np.zeros((8, 10, 3), np.uint8)] * 5, columns=2, gap=1)
    assert sheet.shape == (3 * 9, 2 * 11, 3)
    preview_main([str(tmp_path / "sheet.png"), "-n", "3", "--columns", "3", "--boxes"])
    assert cv2.imread(str(tmp_path / "sheet.png")).shape[1] == 3 * 260


# ---------------------------------------------------------------- the raw collection


def _hashes(root: Path) -> dict[str, str]:
    files = [p for p in sorted(root.rglob("*")) if p.is_file()]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _write(out: Path, seed: int) -> dict:
    return write_raw_collection(out, world_seed=seed, n_groups=2, images_per_group=(6, 6), cast_size=(2, 4))


def test_collection_layout_and_truth(tmp_path):
    out = tmp_path / "raw"
    meta = _write(out, 0)
    truth_path = default_truth_path(out)
    assert Path(meta["truth_path"]) == truth_path and truth_path.parent == tmp_path, "truth lies outside"
    on_disk = json.loads((out / METADATA_FILE).read_text())
    assert on_disk["toy_world"] is True and on_disk["world_seed"] == 0
    assert "not real people" in on_disk["note"]
    assert on_disk["n_images"] == 12 and on_disk["n_groups"] == 2

    groups = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(groups) == 2 and all(g.name.split("_")[0] in ("video", "album", "event") for g in groups)
    truth = {(r["group"], r["image"]): r for r in load_truth(truth_path)}
    assert len(truth) == 12
    for g in groups:
        lines = [json.loads(line) for line in (g / CAPTIONS_FILE).read_text().splitlines()]
        pngs = sorted(p.name for p in g.glob("*.png"))
        assert [r["image"] for r in lines] == pngs and len(pngs) == 6
        seen = []
        for r in lines:
            img = cv2.imread(str(g / r["image"]))
            assert img.shape == (256, 256, 3)
            t = truth[(g.name, r["image"])]
            assert t["caption"] == r["caption"] and caption_ids(r["caption"]) == t["identity_ids"].tolist()
            assert t["boxes"].shape == (len(t["identity_ids"]), 4) and t["landmarks"].shape[1:] == (5, 2)
            seen += t["identity_ids"].tolist()
        assert 2 <= len(set(seen)) <= 4, "a group shows its own small cast"
    assert not any(p.suffix == ".jsonl" and "truth" in p.name for p in out.rglob("*")), "no truth inside"


def test_collection_is_byte_deterministic(tmp_path):
    _write(tmp_path / "a" / "raw", 0)
    _write(tmp_path / "b" / "raw", 0)
    _write(tmp_path / "c" / "raw", 1)
    a, b, c = (_hashes(tmp_path / x) for x in "abc")
    assert a == b and len(a) == 1 + 2 + 2 * 6 + 1  # metadata, 2 caption files, 12 PNGs, the truth file
    assert a != c and set(a.values()).isdisjoint(
        v for k, v in c.items() if k.endswith(".png")
    ), "another world seed gives other images"


def test_writer_refuses_a_non_empty_folder_and_truth_inside(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "stale.png").write_bytes(b"x")
    with pytest.raises(FileExistsError):
        write_raw_collection(tmp_path / "raw", n_groups=1)
    with pytest.raises(ValueError, match="outside"):
        write_raw_collection(tmp_path / "new", n_groups=1, truth_path=tmp_path / "new" / "t.jsonl")


def test_plan_casts_recur_and_everyone_appears_twice():
    plans = plan_collection(0, 40)
    assert plan_collection(0, 40) == plans
    groups_of: dict[int, int] = {}
    for p in plans:
        assert 2 <= len(p.cast) <= 6 and 6 <= len(p.images) <= 20
        for i in p.cast:
            groups_of[i] = groups_of.get(i, 0) + 1
        for i in p.cast:
            assert sum(i in shown for shown in p.images) >= 2
        assert all(1 <= len(shown) <= 4 and set(shown) <= set(p.cast) for shown in p.images)
    recurring = [i for i, n in groups_of.items() if n > 1]
    assert 0 < len(recurring) < 0.5 * len(groups_of), "some identities recur in a few groups"
