"""Toy-world face detector: targets, loss, a tiny training run, ONNX routing and the evaluation metrics.

Full-quality numbers (P/R >= 0.95 on held-out identities) come from the build, not from these tests.
"""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from insightface.model_zoo.scrfd import SCRFD

from umo.faces.detect import FaceDetector
from umo.faces.types import Detections
from umo.toy.config import ToyDetectorConfig
from umo.toy.onnx_export import export_detector_onnx
from umo.toy.world.detector import (
    DETECTOR_FILE,
    SCENE_SIZE,
    ToyDetector,
    assign_targets,
    cell_centers,
    detection_loss,
    detection_metrics,
    flip_scene,
    greedy_match,
    random_scene,
    render_training_set,
    to_detector_input,
    train_detector,
)

TINY = ToyDetectorConfig(steps=30, batch=4, seed=0, n_scenes=8, width=8)
IDS = range(0, 20)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scenes():
    rng, cache = np.random.default_rng(3), {}
    return [random_scene(0, range(0, 20), rng, cache) for _ in range(6)]


def test_targets_decode_back_to_boxes_and_landmarks(scenes):
    centers, strides = cell_centers(*SCENE_SIZE)
    for sc in scenes:
        pos, target = assign_targets(sc.boxes, sc.landmarks, centers, strides)
        assert pos.sum() >= len(sc.boxes)
        c, s = centers[pos], strides[pos][:, None]
        boxes = np.concatenate([c - target[pos, :2] * s, c + target[pos, 2:4] * s], axis=1)
        kps = (c[:, None] + target[pos, 4:].reshape(-1, 5, 2) * s[:, :, None]).reshape(-1, 5, 2)
        # every positive cell decodes exactly to one ground-truth face
        for b, k in zip(boxes, kps):
            j = int(np.argmin(np.abs(sc.boxes - b).sum(1)))
            np.testing.assert_allclose(b, sc.boxes[j], atol=1e-3)
            np.testing.assert_allclose(k, sc.landmarks[j], atol=1e-3)


def test_flip_keeps_left_eye_on_the_image_left(scenes):
    sc = scenes[0]
    img, boxes, kps = flip_scene(sc.image, sc.boxes, sc.landmarks)
    assert (kps[:, 0, 0] < kps[:, 1, 0]).all() and (kps[:, 3, 0] < kps[:, 4, 0]).all()
    assert (boxes[:, 2] > boxes[:, 0]).all()
    np.testing.assert_array_equal(img[:, 0], sc.image[:, -1])


def test_short_training_lowers_the_loss_and_changes_every_parameter():
    torch.manual_seed(TINY.seed)
    init = ToyDetector(TINY.width)  # train_detector seeds torch the same way before building its model
    model = train_detector(0, train_ids=IDS, config=TINY, log_every=0)
    for (name, before), after in zip(init.state_dict().items(), model.state_dict().values()):
        if name.endswith("num_batches_tracked"):
            continue
        assert not torch.equal(before, after), f"{name} did not change"

    images, boxes, kps = render_training_set(0, range(0, 20), 8, seed=TINY.seed * 7919)
    centers, strides = cell_centers(*SCENE_SIZE)
    targets = [assign_targets(b, k, centers, strides) for b, k in zip(boxes, kps)]
    pos = torch.from_numpy(np.stack([t[0] for t in targets]))
    tgt = torch.from_numpy(np.stack([t[1] for t in targets]))
    x = to_detector_input(images)
    with torch.no_grad():
        loss_before = detection_loss(copy.deepcopy(init).train().forward_raw(x), pos, tgt)["total"]
        loss_after = detection_loss(copy.deepcopy(model).train().forward_raw(x), pos, tgt)["total"]
    assert loss_after < 0.8 * loss_before


def test_training_is_deterministic():
    torch.use_deterministic_algorithms(True)
    try:
        a = train_detector(0, train_ids=IDS, config=TINY, log_every=0).state_dict()
        b = train_detector(0, train_ids=IDS, config=TINY, log_every=0).state_dict()
    finally:
        torch.use_deterministic_algorithms(False)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_export_routes_to_insightface_scrfd_and_matches_torch(tmp_path, scenes):
    torch.manual_seed(0)
    model = ToyDetector(8).eval()
    path = export_detector_onnx(model, tmp_path / DETECTOR_FILE)
    det = FaceDetector(path, det_thresh=0.0)
    assert isinstance(det.model, SCRFD) and det.model.use_kps and det.batched
    assert det.model._feat_stride_fpn == [8, 16, 32] and det.model._num_anchors == 2

    images = np.stack([sc.image for sc in scenes[:2]])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_outs = sess.run(None, {"input": to_detector_input(images).numpy()})
    with torch.no_grad():
        torch_outs = model(to_detector_input(images))
    for o, t in zip(onnx_outs, torch_outs):
        np.testing.assert_allclose(o, t.numpy(), atol=1e-4)
    out = det.detect(images)
    assert len(out) == 2 and all(len(d) > 0 for d in out)  # threshold 0: something is found everywhere


def test_metrics_of_an_oracle_are_perfect(scenes):
    oracle = [Detections(sc.boxes, sc.landmarks, np.ones(len(sc.boxes), np.float32)) for sc in scenes]
    m = detection_metrics(oracle, scenes)
    assert m["precision"] == 1.0 and m["recall"] == 1.0 and m["lmk_mean"] == 0.0
    assert m["n_faces"] == sum(len(sc.boxes) for sc in scenes)


def test_metrics_count_duplicates_and_misses(scenes):
    sc = scenes[0]
    gt = sc.boxes[:1]
    shifted = sc.landmarks[:1] + np.float32(2.0)
    # a duplicate of the same face (lower score) is a false positive; a box far away matches nothing
    far = np.array([[0, 0, 5, 5]], np.float32)
    det = Detections(np.concatenate([gt, gt, far]), np.concatenate([shifted, shifted, shifted]),
                     np.array([0.9, 0.8, 0.7], np.float32))
    m = detection_metrics([det], [sc])
    assert m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(1 / len(sc.boxes))
    assert m["lmk_mean"] == pytest.approx(2.0 * np.sqrt(2.0), rel=1e-5)


def test_greedy_match_prefers_the_best_score():
    gt = np.array([[0, 0, 10, 10], [20, 0, 30, 10]], np.float32)
    pred = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 0, 30, 10]], np.float32)
    assert greedy_match(pred, np.array([0.5, 0.9, 0.7]), gt) == [(1, 0), (2, 1)]
    assert greedy_match(pred[:0], np.zeros(0), gt) == []
