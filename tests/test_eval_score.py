"""Judge scoring and aggregation: hand-worked cases on both published scales, and the real (toy) judge."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from umo.config import load_config
from umo.eval.score import SCALES, ItemScore, Judge, aggregate, score_image, score_item

ROOT = Path(__file__).resolve().parents[1]


def item_from(sims, name="x"):
    """score_item from similarity matrices: references = identity rows, faces = the matrix columns."""
    m = len(sims[0])
    refs = np.eye(m, 8)
    faces = [np.asarray(s, np.float64).T @ refs[:m] if np.size(s) else np.zeros((0, 8)) for s in sims]
    # faces are (N, D) with (refs @ faces.T) == sim, since refs are orthonormal
    return score_item(name, refs, faces)


def test_xversebench_scale_pools_the_grid_entries():
    grid = [[[0.9, 0.3], [0.2, 0.6]],          # 2 faces: conf 0.6667 for both; match 0.75
            [[0.5], [0.4]],                    # 1 face: no ID-Conf entry; match 0.5
            np.zeros((2, 0)),                  # no face: ID-Sim 0, match 0
            [[0.8, 0.7, 0.1], [0.6, 0.75, 0.2]]]  # 3 faces: conf 0.125 / 0.2; match 0.775
    r = aggregate([item_from(grid)], SCALES["xverse"])
    assert r["id_sim"] == pytest.approx(100 * (0.75 + 0.45 + 0.0 + 0.775) / 4)      # 49.375
    assert r["id_conf"] == pytest.approx(100 * (2 * 0.6667 + 0.125 + 0.2) / 4, abs=1e-2)  # 41.46
    assert r["id_match"] == pytest.approx(100 * (0.75 + 0.5 + 0.0 + 0.775) / 4)    # 50.625
    assert r["face_count_accuracy"] == 0.25 and r["items"] == 1 and r["unscored"] == 0


def test_omnicontext_scale_and_the_breakdown_by_identities():
    a = item_from([[[0.62, 0.1]]], "a")                    # 1 identity, 2 faces
    b = item_from([[[0.3, -0.1], [0.1, -0.2]]], "b")       # 2 identities: conf capped at 1
    r = aggregate([a, b], SCALES["omnicontext"])
    assert r["id_sim"] == pytest.approx(10 * (0.62 + 0.3 + 0.1) / 3)              # 3.4: 3 (image, reference)
    assert r["id_conf"] == pytest.approx(10 * ((0.62 - 0.1) / 0.62 + 1.0 + 1.0) / 3, abs=1e-3)   # 9.46
    assert r["id_match"] == pytest.approx(10 * (0.62 + 0.05) / 2)                 # 3.35: 2 images
    assert r["face_count_accuracy"] == 0.5
    assert r["by_identities"]["1"]["id_sim"] == pytest.approx(6.2)
    assert r["by_identities"]["2"]["id_sim"] == pytest.approx(2.0)
    assert r["by_identities"]["2"]["id_conf"] == pytest.approx(10.0)


def test_the_set_mean_pools_entries_not_item_means():
    """The public evaluators' rule: one mean over every (item, image, reference) entry (module docstring).

    Item A, 2 people, 1 image with 2 faces:      rows [0.8, 0.2] and [0.1, 0.5]
        ID-Sim 0.8, 0.5; ID-Conf (0.8-0.2)/0.8 = 0.75, (0.5-0.1)/0.5 = 0.8; ID-Match (0.8+0.5)/2 = 0.65; 2 == 2
    Item B, 1 person, 3 images:
        image 1, 2 faces [0.6, 0.3]:  ID-Sim 0.6, ID-Conf (0.6-0.3)/0.6 = 0.5, ID-Match 0.6, 2 != 1
        image 2, 1 face  [0.4]:       ID-Sim 0.4, no ID-Conf entry,             ID-Match 0.4, 1 == 1
        image 3, no face:             ID-Sim 0,   no ID-Conf entry,             ID-Match 0,   0 != 1
    Pooled (ours, the public scripts'):             Item first (the old rule):
        ID-Sim   (0.8+0.5+0.6+0.4+0)/5 = 0.46            (0.65 + 1.0/3)/2  = 0.4917
        ID-Conf  (0.75+0.8+0.5)/3      = 0.68333         (0.775 + 0.5)/2   = 0.6375
        ID-Match (0.65+0.6+0.4+0)/4    = 0.4125          (0.65 + 1.0/3)/2  = 0.4917
        count    (1+0+1+0)/4           = 0.5             (1 + 1/3)/2       = 0.6667
    """
    a = item_from([[[0.8, 0.2], [0.1, 0.5]]], "A")
    b = item_from([[[0.6, 0.3]], [[0.4]], np.zeros((1, 0))], "B")
    r = aggregate([a, b], SCALES["xverse"])
    assert (r["id_sim"], r["id_conf"], r["id_match"], r["face_count_accuracy"]) == (46.0, 68.3333, 41.25, 0.5)
    assert r["items"] == 2 and r["unscored"] == 0
    # the per-number-of-identities blocks pool within their own items
    assert r["by_identities"]["2"] == {"items": 1, "id_sim": 65.0, "id_conf": 77.5, "id_match": 65.0,
                                       "face_count_accuracy": 1.0, "collision_rate": 0.0,
                                       "sim_gt": None, "copy_paste": None, "gt_images_measured": 0}
    assert r["by_identities"]["1"] == {"items": 1, "id_sim": 33.3333, "id_conf": 50.0, "id_match": 33.3333,
                                       "face_count_accuracy": 0.3333, "collision_rate": None,
                                       "sim_gt": None, "copy_paste": None, "gt_images_measured": 0}
    # the old rule's numbers, to show that the two definitions differ on this case
    item_first = [np.mean([a.mean(k), b.mean(k)]) for k in ("id_sim", "id_conf", "id_match", "count_ok")]
    assert item_first == pytest.approx([0.49167, 0.6375, 0.49167, 0.66667], abs=1e-5)


class FixedDetections:
    """A detector that reports the given `Detections` for every image."""

    def __init__(self, det) -> None:
        self.det = det

    def detect(self, images):
        return [self.det for _ in images]


class RowRecognizer:
    """A recognizer giving face k of an image the unit vector e_k (so references e_0, e_1 match faces 0, 1);
    it records how many faces it was asked to embed."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    def embed(self, images, detections):
        self.asked += [len(d) for d in detections]
        return [np.eye(len(d), 8, dtype=np.float32) for d in detections]


def test_a_face_with_degenerate_landmarks_is_not_a_face():
    """Two detections, the second with its 5 landmarks on one point: the judge aligns, embeds and counts one
    face, so the image has no ID-Conf entry (N = 1 < 2) and its face count is 1 (wrong for 2 people)."""
    from umo.faces.types import Detections

    good = np.array([[30, 40], [60, 40], [45, 55], [33, 70], [57, 70]], np.float32)
    det = Detections(np.array([[20, 25, 70, 85], [80, 25, 130, 85]], np.float32),
                     np.stack([good, np.full((5, 2), 100.0, np.float32)]), np.array([0.9, 0.9], np.float32))
    recognizer = RowRecognizer()
    judge = Judge(FixedDetections(det), recognizer)
    image = np.zeros((160, 160, 3), np.uint8)
    (boxes, faces), = judge.faces([image])
    assert recognizer.asked == [1] and len(faces) == 1
    np.testing.assert_array_equal(boxes, det.boxes[:1])
    item = score_item("x", np.eye(2, 8), [faces])  # 2 people
    (s,) = item.images
    assert (s.faces, s.count_ok, s.id_conf, s.id_sim) == (1, False, None, 0.5)
    r = aggregate([item], 100)
    assert r["id_conf"] is None and r["face_count_accuracy"] == 0.0
    # with the degenerate face counted (the old rule), the image had an ID-Conf entry and a right count
    counted = score_item("x", np.eye(2, 8), [np.eye(2, 8)])
    assert counted.images[0].id_conf is not None and counted.images[0].count_ok
    # a reference image whose only face is degenerate has no reference face
    only_bad = Detections(det.boxes[1:], det.landmarks[1:], det.scores[1:])
    refs, missing = Judge(FixedDetections(only_bad), RowRecognizer()).references([image])
    assert missing == [0] and not refs.any()


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


def test_collision_is_two_references_choosing_the_same_face():
    # ref 0's best is face 1 (0.7), ref 1's best is face 1 too (0.6): one face won both -> collision
    assert score_image(np.array([[0.1, 0.7], [0.2, 0.6]])).collision is True
    # each reference has its own best face (0.9 on face 0, 0.8 on face 1)
    assert score_image(np.array([[0.9, 0.1], [0.3, 0.8]])).collision is False
    # one face for two people: both choose it; one reference or no face: undefined
    assert score_image(np.array([[0.5], [0.4]])).collision is True
    assert score_image(np.array([[0.5, 0.1]])).collision is None
    assert score_image(np.zeros((2, 0))).collision is None
    item = ItemScore("x", 2, [score_image(np.array([[0.1, 0.7], [0.2, 0.6]])),
                              score_image(np.array([[0.9, 0.1], [0.3, 0.8]])), score_image(np.zeros((2, 0)))])
    assert aggregate([item], 100.0)["collision_rate"] == 0.5  # 1 of the 2 images where it is defined


def test_sim_gt_and_copy_paste_are_measured_only_where_the_face_counts_agree():
    def at(*degrees):  # unit vectors in a plane (padded to 3-D): θ between two of them is their difference
        rad = np.radians(degrees)
        return np.stack([np.cos(rad), np.sin(rad), np.zeros_like(rad)], axis=1)

    references, target = at(5, 60), at(20, 40)
    # image 1: faces at 0 and 10 (Hungarian: g1-t1/r1, g2-t2/r2): CP 1 and -1, mean 0; Sim(GT) (cos 20 + cos 30) / 2
    # image 2: faces at 5 and 60, the reference photos themselves; image 3: one face for two people
    item = score_item("x", references, [at(0, 10), at(5, 60), at(0)], target=target)
    first, second, third = item.images
    assert first.copy_paste == pytest.approx(0.0) and first.sim_gt == pytest.approx(
        (np.cos(np.radians(20)) + np.cos(np.radians(30))) / 2)
    # image 2 copies the references: g1 = r1 (5) matched to t1 (20): (15 - 0) / 15 = 1; g2 = r2 (60) to t2 (40):
    # (20 - 0) / 20 = 1. CP 1, the photos pasted.
    assert second.copy_paste == pytest.approx(1.0)
    assert third.sim_gt is None and third.copy_paste is None and third.id_sim > 0  # ID-Sim still scored
    r = aggregate([item], 100.0)
    assert r["gt_images_measured"] == 2 and r["images_scored"] == 3
    assert r["copy_paste"] == pytest.approx(0.5)  # (0 x 2 faces + 1 x 2 faces) / 4 faces
    assert r["sim_gt"] == pytest.approx(100 * (first.sim_gt + second.sim_gt) / 2, abs=1e-4)
    # no target at all (a benchmark without ground truth): nothing is measured, and the set says so
    plain = aggregate([score_item("y", references, [at(0, 10)])], 100.0)
    assert (plain["sim_gt"], plain["copy_paste"], plain["gt_images_measured"]) == (None, None, 0)
