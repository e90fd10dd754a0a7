"""Judge scoring and aggregation: hand-worked cases on both published scales, and the real (toy) judge."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from umo.config import load_config
from umo.eval.score import SCALES, Judge, aggregate, score_image, score_item

ROOT = Path(__file__).resolve().parents[1]


def item_from(sims, name="x"):
    """score_item from similarity matrices: references = identity rows, faces = the matrix columns."""
    m = len(sims[0])
    refs = np.eye(m, 8)
    faces = [np.asarray(s, np.float64).T @ refs[:m] if np.size(s) else np.zeros((0, 8)) for s in sims]
    # faces are (N, D) with (refs @ faces.T) == sim, since refs are orthonormal
    return score_item(name, refs, faces)


def test_xversebench_scale_averages_the_grid_then_the_items():
    grid = [[[0.9, 0.3], [0.2, 0.6]],          # 2 faces: conf 0.6667 for both; match 0.75
            [[0.5], [0.4]],                    # 1 face: no ID-Conf entry; match 0.5
            np.zeros((2, 0)),                  # no face: ID-Sim 0, match 0
            [[0.8, 0.7, 0.1], [0.6, 0.75, 0.2]]]  # 3 faces: conf 0.125 / 0.2; match 0.775
    r = aggregate([item_from(grid)], SCALES["xverse"])
    assert r["id_sim"] == pytest.approx(100 * (0.75 + 0.45 + 0.0 + 0.775) / 4)      # 49.375
    assert r["id_conf"] == pytest.approx(100 * (0.6667 + 0.1625) / 2, abs=1e-2)     # 41.46
    assert r["id_match"] == pytest.approx(100 * (0.75 + 0.5 + 0.0 + 0.775) / 4)    # 50.625
    assert r["face_count_accuracy"] == 0.25 and r["items"] == 1 and r["unscored"] == 0


def test_omnicontext_scale_and_the_breakdown_by_identities():
    a = item_from([[[0.62, 0.1]]], "a")                    # 1 identity, 2 faces
    b = item_from([[[0.3, -0.1], [0.1, -0.2]]], "b")       # 2 identities: conf capped at 1
    r = aggregate([a, b], SCALES["omnicontext"])
    assert r["id_sim"] == pytest.approx(10 * (0.62 + 0.2) / 2)                    # 4.1
    assert r["id_conf"] == pytest.approx(10 * ((0.62 - 0.1) / 0.62 + 1.0) / 2, abs=1e-3)   # 9.19
    assert r["id_match"] == pytest.approx(10 * (0.62 + 0.05) / 2)                 # 3.35
    assert r["face_count_accuracy"] == 0.5
    assert r["by_identities"]["1"]["id_sim"] == pytest.approx(6.2)
    assert r["by_identities"]["2"]["id_sim"] == pytest.approx(2.0)
    assert r["by_identities"]["2"]["id_conf"] == pytest.approx(10.0)


def test_confusion_is_zero_when_the_best_similarity_is_not_positive():
    s = score_image(np.array([[-0.2, -0.5]]))
    assert s.id_conf == 0.0 and s.id_sim == pytest.approx(-0.2)


def test_unscored_items_are_counted_not_averaged():
    a = item_from([[[0.5]]], "a")
    b = item_from([[[0.9]]], "b")
    b.unscored = "reference_without_face"
    r = aggregate([a, b], 100)
    assert r["items"] == 1 and r["unscored"] == 1 and r["id_sim"] == pytest.approx(50.0)


def test_the_judge_embeds_each_face_once_and_scores_a_scene_against_its_own_people(toy_world):
    config = load_config(ROOT / "params.yaml", toy_world.faces_overrides())
    judge = Judge.from_config(config.faces)
    embedded = []
    inner = judge.recognizer.embed_aligned
    judge.recognizer.embed_aligned = lambda faces: (embedded.append(len(faces)), inner(faces))[1]
    truth = [json.loads(line) for line in toy_world.truth.read_text().splitlines()]
    scene = next(t for t in truth if len(t["identity_ids"]) == 2)
    rgb = np.asarray(Image.open(toy_world.raw / scene["group"] / scene["image"]).convert("RGB"))
    blank = np.full((256, 256, 3), 255, np.uint8)
    refs, missing = judge.references([rgb, blank])
    assert missing == [1] and not refs[1].any() and np.linalg.norm(refs[0]) == pytest.approx(1, abs=1e-4)
    (boxes, faces), = judge.faces([rgb])
    # one judge call each: the reference image's largest face only, then every face of the scene, once
    assert len(faces) == 2 and embedded == [1, 2]
    item = score_item("scene", faces, [faces])  # a scene against its own two faces
    assert item.images[0].id_sim == pytest.approx(1.0, abs=1e-4) and item.images[0].count_ok
    assert item.images[0].id_match == pytest.approx(1.0, abs=1e-4)
