"""FaceDetector end to end: tiny synthetic detectors exported to SCRFD-layout ONNX, loaded through
insightface's real routing, run on synthetic images whose faces sit at known landmarks."""

from __future__ import annotations

import logging
import socket
import warnings

import numpy as np
import pytest
import torch
from insightface.model_zoo.arcface_onnx import ArcFaceONNX
from insightface.model_zoo.scrfd import SCRFD
from torch import nn

from umo.config import ConfigError, DetectorConfig, load_config
from umo.faces import runtime
from umo.faces.detect import FaceDetector
from umo.faces.embed import OnnxRecognizer
from umo.faces.runtime import execution_providers
from umo.faces.types import Detections
from umo.toy.onnx_export import export_detector_onnx, export_recognizer_onnx
from umo.toy.tiny.faces import (
    MAX_TEXTURE_GREENNESS,
    MarkerDetector,
    face_landmarks,
    identity_patch,
    paste_faces,
    random_background,
)

FACE = 64  # face side in pixels, MarkerDetector's default

# Nose points of up to four faces in a 256 x 320 (H x W) image: off the stride-8 grid on purpose.
CENTERS = [(60.0, 70.0), (203.3, 150.7), (250.5, 64.0), (101.0, 197.0)]


class TinyEmbedder(nn.Module):
    """(N, 3, 112, 112) -> (N, 8): just enough to be routed as a recognizer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 8, stride=8)
        self.fc = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


class Unbatched(nn.Module):
    """The same outputs without the batch axis, (A, C): the layout of det_10g.onnx and most real packs."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(o[0] for o in self.inner(x))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    export_detector_onnx(MarkerDetector(face_size=FACE), d / "det_marker.onnx")
    torch.manual_seed(0)
    export_recognizer_onnx(TinyEmbedder(), d / "rec_tiny.onnx")
    return d


@pytest.fixture(scope="module")
def detector(model_dir) -> FaceDetector:
    return FaceDetector(model_dir / "det_marker.onnx")


def scene(seed: int, centers, h: int = 256, w: int = 320) -> tuple[np.ndarray, np.ndarray]:
    faces = [(identity_patch(seed * 10 + k), c) for k, c in enumerate(centers)]
    return paste_faces(random_background(seed, h, w), faces, FACE)


def assert_matches(det: Detections, landmarks: np.ndarray, tol: float = 2.0) -> None:
    """Each true face has exactly one detection, with landmarks and box within tol pixels."""
    assert len(det) == len(landmarks)
    assert det.boxes.dtype == det.landmarks.dtype == det.scores.dtype == np.float32
    assert det.boxes.shape == (len(landmarks), 4) and det.landmarks.shape == (len(landmarks), 5, 2)
    assert np.all(np.diff(det.scores) <= 0), "best score first"
    assert np.all((det.scores >= 0.5) & (det.scores <= 1.0))
    used = set()
    for lm in landmarks:
        j = int(np.argmin(np.linalg.norm(det.landmarks[:, 2] - lm[2], axis=1)))
        assert j not in used
        used.add(j)
        assert np.abs(det.landmarks[j] - lm).max() < tol, (det.landmarks[j], lm)
        nose = lm[2]
        box = np.concatenate([nose - FACE / 2, nose + FACE / 2])
        assert np.abs(det.boxes[j] - box).max() < tol + 1.0, (det.boxes[j], box)


def count_runs(monkeypatch, det: FaceDetector) -> list[int]:
    """Spy on session.run: record the batch size of every call, then call through."""
    calls: list[int] = []
    real = det.model.session.run

    def run(names, feeds, *args, **kwargs):
        calls.append(next(iter(feeds.values())).shape[0])
        return real(names, feeds, *args, **kwargs)

    monkeypatch.setattr(det.model.session, "run", run)
    return calls


def test_loads_through_insightface_routing(detector):
    assert isinstance(detector.model, SCRFD)
    assert detector.model.taskname == "detection" and detector.model.use_kps
    assert detector.model._feat_stride_fpn == [8, 16, 32] and detector.model._num_anchors == 2
    assert detector.batched


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_detects_faces_at_known_landmarks(detector, n):
    image, landmarks = scene(n, CENTERS[:n])
    (det,) = detector.detect([image])
    assert_matches(det, landmarks)


def test_empty_image_gives_empty_detections(detector):
    (det,) = detector.detect([random_background(7, 256, 320)])
    assert len(det) == 0
    assert det.boxes.shape == (0, 4) and det.landmarks.shape == (0, 5, 2) and det.scores.shape == (0,)
    assert detector.detect([]) == []


def test_batch_runs_session_once_and_matches_single_calls(detector, monkeypatch):
    scenes = [scene(s, CENTERS[: s % 4 + 1]) for s in range(4)] + [(random_background(9, 256, 320), None)]
    images = [img for img, _ in scenes]
    singles = [detector.detect([img])[0] for img in images]
    calls = count_runs(monkeypatch, detector)
    batch = detector.detect(np.stack(images))  # one (B, H, W, 3) array
    assert calls == [len(images)]
    for got, want in zip(batch, singles):
        for a, b in zip((got.boxes, got.landmarks, got.scores), (want.boxes, want.landmarks, want.scores)):
            np.testing.assert_allclose(a, b, atol=1e-4)


def test_images_of_different_sizes_are_letterboxed_and_scaled_back(detector, monkeypatch):
    # Letterbox scales into 640 x 640: 2.0, ~1.67 and ~0.67 network pixels per image pixel.
    sizes_and_centers = [((320, 256), [(60.0, 70.0), (180.0, 250.0)]),
                         ((288, 384), [(300.5, 100.0)]),
                         ((800, 960), [(120.0, 90.0), (700.0, 600.0), (400.0, 420.0)])]
    images, truths = [], []
    for seed, ((h, w), centers) in enumerate(sizes_and_centers):
        img, lms = scene(seed, centers, h, w)
        images.append(img)
        truths.append(lms)
    calls = count_runs(monkeypatch, detector)
    dets = detector.detect(images)
    assert calls == [3]
    for det, lms in zip(dets, truths):
        assert_matches(det, lms)


def test_explicit_input_size(model_dir):
    det = FaceDetector(model_dir / "det_marker.onnx", input_size=(384, 320))  # (width, height)
    image, landmarks = scene(3, CENTERS[:3])  # 320 x 256 -> scaled by 1.2
    assert_matches(det.detect([image])[0], landmarks)
    with pytest.raises(ValueError, match="multiples of 32"):
        FaceDetector(model_dir / "det_marker.onnx", input_size=(300, 300))


def test_detect_tensor_matches_detect(detector):
    images = [scene(s, CENTERS[:2])[0] for s in range(2)]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    x.requires_grad_(True)
    for got, want in zip(detector.detect_tensor(x), detector.detect(images)):
        np.testing.assert_allclose(got.landmarks, want.landmarks, atol=1e-5)
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-6)


def test_unbatched_model_runs_once_per_image(tmp_path, detector, monkeypatch):
    path = tmp_path / "det_unbatched.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(Unbatched(MarkerDetector(face_size=FACE)).eval(), (torch.zeros(1, 3, 256, 256),),
                          str(path), input_names=["input"], output_names=[f"o{i}" for i in range(9)],
                          dynamic_axes={"input": {2: "height", 3: "width"}}, dynamo=False, opset_version=17)
    det = FaceDetector(path)
    assert isinstance(det.model, SCRFD) and not det.batched
    images = [scene(s, CENTERS[: s + 1])[0] for s in range(3)]
    calls = count_runs(monkeypatch, det)
    got = det.detect(images)
    assert calls == [1, 1, 1]
    for a, b in zip(got, detector.detect(images)):
        np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-4)


# ---------------------------------------------------------------- model packs


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """A fresh HOME, and any socket connection fails: loading must neither download nor write there."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    yield home
    assert not (home / ".insightface").exists()


def test_model_root_errors_name_the_path_and_expected_files(tmp_path, model_dir, offline):
    missing = tmp_path / "models"
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        FaceDetector.from_model_root(missing, "buffalo_l")
    assert str(missing / "buffalo_l") in str(e.value) and "det_10g.onnx" in str(e.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*\.onnx") as e:
        FaceDetector.from_model_root(empty)
    assert str(empty) in str(e.value) and "det_10g.onnx" in str(e.value)

    rec_only = tmp_path / "rec_only"
    rec_only.mkdir()
    (rec_only / "w600k_tiny.onnx").write_bytes((model_dir / "rec_tiny.onnx").read_bytes())
    with pytest.raises(FileNotFoundError, match="no detector ONNX") as e:
        FaceDetector.from_model_root(tmp_path, "rec_only")
    assert str(rec_only) in str(e.value) and "w600k_tiny.onnx" in str(e.value)


def test_model_root_picks_the_detector_of_a_pack(tmp_path, model_dir, offline):
    pack = tmp_path / "root" / "tiny_pack"
    pack.mkdir(parents=True)
    # The recognizer sorts first: the choice must come from routing, not from the file order.
    (pack / "a_w600k.onnx").write_bytes((model_dir / "rec_tiny.onnx").read_bytes())
    (pack / "det_marker.onnx").write_bytes((model_dir / "det_marker.onnx").read_bytes())
    det = FaceDetector.from_model_root(tmp_path / "root", "tiny_pack", det_thresh=0.6)
    assert det.model_file.name == "det_marker.onnx" and isinstance(det.model, SCRFD)
    assert det.det_thresh == 0.6
    image, landmarks = scene(1, CENTERS[:2])
    assert_matches(det.detect([image])[0], landmarks)


def test_recognizer_passed_as_detector_is_rejected(model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"rec_tiny\.onnx.*ArcFaceONNX \(recognition\)"):
        FaceDetector(model_dir / "rec_tiny.onnx")
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        FaceDetector(tmp_path / "nope.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(ValueError, match="broken.onnx"):
        FaceDetector(tmp_path / "broken.onnx")
    with pytest.raises(ValueError, match="broken.onnx"):
        FaceDetector.from_model_root(tmp_path)
    # Sanity: insightface itself sees a recognizer there.
    from insightface.model_zoo import get_model

    assert isinstance(get_model(str(model_dir / "rec_tiny.onnx"), providers=["CPUExecutionProvider"]),
                      ArcFaceONNX)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([np.zeros((64, 64, 3), np.float32)], "uint8"),
        ([np.zeros((64, 64, 4), np.uint8)], "3 channels"),
        ([np.zeros((64, 64), np.uint8)], "ndim 2"),
        (np.zeros((64, 64, 3), np.uint8), r"\(B, H, W, 3\)"),
        ("image.png", "list"),
    ],
)
def test_bad_images_are_rejected(detector, images, message):
    with pytest.raises(ValueError, match=message):
        detector.detect(images)


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (torch.zeros(1, 4, 64, 64), "3 RGB channels"),
        (torch.zeros(3, 64, 64), r"\(B, 3, H, W\)"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "float"),
    ],
)
def test_bad_tensors_are_rejected(detector, tensor, message):
    with pytest.raises(ValueError, match=message):
        detector.detect_tensor(tensor)


# ---------------------------------------------------------------- export and synthetic helpers


def test_export_detector_checks_the_signature(tmp_path):
    class TooFew(nn.Module):
        def forward(self, x):
            return tuple(MarkerDetector()(x)[:6])

    with pytest.raises(ValueError, match="9 tensors"):
        export_detector_onnx(TooFew(), tmp_path / "few.onnx")

    class WrongKps(nn.Module):
        def forward(self, x):
            outs = list(MarkerDetector()(x))
            outs[6] = outs[6][..., :4]
            return tuple(outs)

    with pytest.raises(ValueError, match=r"output 6 \(kps, stride 8\)"):
        export_detector_onnx(WrongKps(), tmp_path / "kps.onnx")
    with pytest.raises(ValueError, match="multiples of 32"):
        export_detector_onnx(MarkerDetector(), tmp_path / "d.onnx", example_size=(100, 100))
    assert not list(tmp_path.iterdir())


def test_synthetic_helpers():
    np.testing.assert_array_equal(identity_patch(3, 32), identity_patch(3, 32))
    assert np.abs(identity_patch(3, 32).astype(int) - identity_patch(4, 32)).mean() > 10
    for img in (identity_patch(5, 64), random_background(5, 64, 96)):
        rgb = img.astype(np.float32)
        assert (rgb[..., 1] - (rgb[..., 0] + rgb[..., 2]) / 2).max() <= MAX_TEXTURE_GREENNESS + 0.5
    lm = face_landmarks((10.0, 20.0), 56.0)
    assert lm.shape == (5, 2) and np.allclose(lm[2], (10.0, 20.0))
    assert lm[0, 0] < lm[1, 0] and lm[0, 1] < lm[2, 1] < lm[3, 1]


# ---------------------------------------------------------------- execution providers (faces.providers)

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def test_providers_resolve_from_the_setting(monkeypatch, caplog):
    """auto: CUDA then the CPU where onnxruntime has CUDA, else the CPU; CUDA asked for (by the list, or by auto
    where torch sees a GPU) but missing: the CPU, said in one log line for the whole process."""
    monkeypatch.setattr(runtime, "_reported", set())
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: [CUDA, CPU])
    assert execution_providers("auto") == [CUDA, CPU]
    assert execution_providers([CUDA]) == [CUDA, CPU] and execution_providers([CPU, CUDA]) == [CPU, CUDA]
    assert execution_providers(None) == [CPU]

    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: [CPU])
    monkeypatch.setattr(runtime.torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="umo.faces.runtime"):
        assert execution_providers("auto") == [CPU]  # a machine without a GPU: nothing to fall back from
        assert not caplog.records
        assert execution_providers([CUDA, CPU]) == [CPU]
        monkeypatch.setattr(runtime.torch.cuda, "is_available", lambda: True)
        assert execution_providers("auto") == [CPU] and execution_providers([CUDA]) == [CPU]
    assert [r.getMessage() for r in caplog.records] == [
        f"faces.providers: {CUDA} not available in this onnxruntime (it has {CPU}); the face models run on {CPU} "
        "(CUDA needs the onnxruntime-gpu package)"]

    with pytest.raises(ValueError, match=r"\['CUDAProvider'\] is not an onnxruntime execution provider"):
        execution_providers(["CUDAProvider"])
    assert load_config(None, ["faces.providers=[CPUExecutionProvider]"]).faces.providers == [CPU]
    assert load_config(None).faces.providers == "auto"
    with pytest.raises(ConfigError, match="providers"):
        load_config(None, ["faces.providers=cuda"])


def test_face_model_sessions_run_on_the_resolved_providers(model_dir, caplog):
    """Built from the setting, the real onnxruntime sessions run on the CPU here, CUDA asked for or not."""
    det = FaceDetector.from_config(DetectorConfig(root=str(model_dir), pack=None), providers="auto")
    assert det.session.get_providers() == [CPU]
    for providers in ("auto", [CUDA, CPU]):
        assert OnnxRecognizer(model_dir / "rec_tiny.onnx", providers=providers).model.session.get_providers() == [CPU]
