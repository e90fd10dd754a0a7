"""Batched face detection with insightface SCRFD-layout ONNX detectors (boxes, 5 landmarks, scores).

Loading is insightface's own (`insightface.model_zoo.get_model` on a local .onnx path, so it never
downloads); we keep its SCRFD object for the session, the output layout (fmc, strides, anchors) and its NMS,
and replace only the per-image `detect` loop with one that letterboxes a whole batch into one blob, runs
the session once, and decodes every image vectorized. Detection is not differentiable and need not be:
alignment (a separate step) carries the gradient from the detected landmarks to the pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from insightface.model_zoo import get_model
from insightface.model_zoo.scrfd import SCRFD, distance2bbox, distance2kps
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf, NoSuchFile

from umo.faces.runtime import execution_providers, session_options
from umo.faces.types import Detections
from umo.images import signed_to_rgb

logger = logging.getLogger(__name__)

EXPECTED_PACK = (
    "an insightface model pack folder with a SCRFD/RetinaFace detector ONNX such as det_10g.onnx or "
    "det_500m.onnx; umo never downloads models: put the files there or point faces.detector.root at them"
)
EXPECTED_DETECTOR = "a detector with 5 landmarks (SCRFD layout, 9 or 15 outputs)"
DEFAULT_INPUT_SIZE = (640, 640)  # (width, height), insightface's det_size default
_ORT_LOAD_ERRORS = (Fail, InvalidGraph, InvalidProtobuf, NoSuchFile)


def _round_up(value: int, multiple: int = 32) -> int:
    return -(-int(value) // multiple) * multiple


def _onnx_output_count(path: Path) -> int:
    """Number of graph outputs, read without weights or a session (insightface routes >= 5 to SCRFD)."""
    try:
        return len(onnx.load(str(path), load_external_data=False).graph.output)
    except (DecodeError, OSError) as exc:
        raise ValueError(f"{path}: not a readable ONNX model ({exc})") from exc


class FaceDetector:
    """A SCRFD-layout face detector (insightface routing), batched over images.

    model_file: a local .onnx that insightface routes to its SCRFD class with keypoints (9 or 15 outputs).
    det_thresh: minimum score in [0, 1]; nms_thresh: IoU above which the lower-scored box is dropped.
    input_size: (width, height) of the network input, multiples of 32; images are letterboxed into it
        (scaled to fit keeping aspect, padded bottom/right). None: the images' own size rounded up to a
        multiple of 32 when all images of a call share one size (padding only, no resampling), else 640x640.
        A detector ONNX with a fixed input size always uses that size.
    providers: onnxruntime execution providers: None (the CPU only), "auto" or a list, as `faces.providers`
        (umo.faces.runtime.execution_providers).
    """

    def __init__(
        self,
        model_file: str | Path,
        *,
        det_thresh: float = 0.5,
        nms_thresh: float = 0.4,
        input_size: tuple[int, int] | None = None,
        providers: str | Sequence[str] | None = None,
    ) -> None:
        path = Path(model_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"detector model {path} does not exist: expected {EXPECTED_DETECTOR} "
                                    f"as a local .onnx file; umo never downloads models")
        if path.suffix != ".onnx":
            # insightface treats a name without .onnx as a model-zoo name to look up (and download).
            raise ValueError(f"detector model {path} must be an .onnx file: expected {EXPECTED_DETECTOR}")
        if not 0.0 <= det_thresh <= 1.0 or not 0.0 <= nms_thresh <= 1.0:
            raise ValueError(f"det_thresh and nms_thresh must lie in [0, 1], got {det_thresh}, {nms_thresh}")
        try:
            model = get_model(str(path), providers=execution_providers(providers), sess_options=session_options())
        except AssertionError as exc:
            # insightface asserts (with or without a message) where a model file is missing or unusable.
            raise ValueError(f"insightface could not load detector {path}: {exc or 'assertion failed'}; "
                             f"expected {EXPECTED_DETECTOR}") from exc
        except _ORT_LOAD_ERRORS as exc:
            raise ValueError(f"onnxruntime could not load detector {path}: {exc}") from exc
        if not isinstance(model, SCRFD) or not model.use_kps:
            if model is None:
                found = "no insightface model type (the router returned None)"
            elif isinstance(model, SCRFD):
                found = f"SCRFD (detection) without landmarks ({len(model.output_names)} outputs)"
            else:
                found = f"{type(model).__name__} ({getattr(model, 'taskname', '?')})"
            raise ValueError(f"detector model {path} routes to {found}, expected {EXPECTED_DETECTOR}")

        self.model_file = path
        self.model: SCRFD = model  # insightface's object: session, fmc, strides, anchors, nms
        self.det_thresh = float(det_thresh)
        model.det_thresh = self.det_thresh
        model.nms_thresh = float(nms_thresh)  # SCRFD.nms reads it from the object
        outputs = model.session.get_outputs()
        inputs = model.session.get_inputs()
        # One session.run per batch needs a free batch axis on the input and rank-3 (B, A, C) outputs.
        self.batched = bool(
            model.batched and not isinstance(inputs[0].shape[0], int)
            and all(len(o.shape) == 3 and not isinstance(o.shape[0], int) for o in outputs)
        )
        self.fixed_input_size: tuple[int, int] | None = (
            tuple(model.static_input_size) if model.static_input_size is not None else None
        )
        if input_size is not None:
            input_size = self._check_input_size(input_size)
            if self.fixed_input_size is not None and input_size != self.fixed_input_size:
                raise ValueError(f"detector model {path} has a fixed input size {self.fixed_input_size} "
                                 f"(width, height); input_size={input_size} cannot be used")
        self.input_size = input_size
        self._centers: dict[tuple[int, int, int], np.ndarray] = {}
        logger.info("face detector %s: %d outputs, strides %s, %d anchors, %s, on %s", path, len(outputs),
                    model._feat_stride_fpn, model._num_anchors, "batched" if self.batched else "per image",
                    ", ".join(model.session.get_providers()))

    @property
    def session(self):
        """The onnxruntime session (insightface's); `detect` looks it up on every call, so a spy set on
        `session.run` sees every run."""
        return self.model.session

    @classmethod
    def from_model_root(cls, root: str | Path, pack: str | None = None, **kwargs) -> "FaceDetector":
        """Load the detector of an insightface model pack folder: root/pack, or root when pack is None.

        Packs hold several ONNX files (detector, recognizer, landmark models ...): the detector is the one
        insightface routes to SCRFD (>= 5 graph outputs), preferring the layouts with landmarks.
        kwargs go to FaceDetector(...). Raises FileNotFoundError naming the folder and what was expected.
        """
        folder = Path(root).expanduser() / pack if pack else Path(root).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"face detector folder {folder} does not exist: expected {EXPECTED_PACK}")
        files = sorted(folder.glob("*.onnx"))
        if not files:
            raise FileNotFoundError(
                f"face detector folder {folder} has no *.onnx file: expected {EXPECTED_PACK}")
        counts = {f: _onnx_output_count(f) for f in files}
        detectors = [f for f, n in counts.items() if n >= 5]
        if not detectors:
            seen = ", ".join(f"{f.name} ({n} outputs)" for f, n in counts.items())
            raise FileNotFoundError(f"face detector folder {folder} has no detector ONNX (>= 5 outputs) "
                                    f"among {seen}: expected {EXPECTED_PACK}")
        with_kps = [f for f in detectors if counts[f] in (9, 15)]
        chosen = (with_kps or detectors)[0]
        if len(detectors) > 1:
            logger.warning("several detector ONNX files in %s: %s; using %s", folder,
                           [f.name for f in detectors], chosen.name)
        return cls(chosen, **kwargs)

    @classmethod
    def from_config(cls, config, *, providers: str | Sequence[str] | None = None) -> "FaceDetector":
        """Load the pack named by a `umo.config.DetectorConfig` (root, pack, det_thresh, nms_thresh,
        input_size [width, height] or None); providers: `faces.providers` (None: the CPU only)."""
        return cls.from_model_root(
            config.root, config.pack, det_thresh=config.det_thresh, nms_thresh=config.nms_thresh,
            input_size=tuple(config.input_size) if config.input_size else None, providers=providers,
        )

    # ---------------------------------------------------------------- input handling

    @staticmethod
    def _check_input_size(size: Sequence[int]) -> tuple[int, int]:
        if len(size) != 2 or any(int(v) <= 0 or int(v) % 32 for v in size):
            raise ValueError(f"input_size must be (width, height), positive multiples of 32, got {size}")
        return int(size[0]), int(size[1])

    @staticmethod
    def _as_image_list(images: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
        """Validate RGB uint8 images: a list of (H, W, 3) or one (B, H, W, 3) array."""
        if isinstance(images, np.ndarray):
            if images.ndim != 4:
                raise ValueError(f"an image array must be (B, H, W, 3) (wrap a single (H, W, 3) image in a "
                                 f"list), got ndim {images.ndim} with shape {images.shape}")
            images = list(images)
        elif not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
            raise ValueError(f"images must be a list of (H, W, 3) uint8 arrays or one (B, H, W, 3) array, "
                             f"got {type(images).__name__}")
        out = []
        for i, img in enumerate(images):
            if not isinstance(img, np.ndarray):
                raise ValueError(f"image {i} must be a numpy array, got {type(img).__name__}")
            if img.dtype != np.uint8:
                raise ValueError(f"image {i} must be RGB uint8 in [0, 255], got dtype {img.dtype}")
            if img.ndim != 3:
                raise ValueError(f"image {i} must be (H, W, 3), got ndim {img.ndim} with shape {img.shape}")
            if img.shape[2] != 3:
                raise ValueError(f"image {i} must have 3 channels (RGB), got {img.shape[2]} in {img.shape}")
            if img.shape[0] == 0 or img.shape[1] == 0:
                raise ValueError(f"image {i} is empty: shape {img.shape}")
            out.append(img)
        return out

    def _network_size(self, images: list[np.ndarray]) -> tuple[tuple[int, int], bool]:
        """((width, height) of the network input for this call, whether padding alone fits the images)."""
        if self.fixed_input_size is not None:
            return self.fixed_input_size, False
        if self.input_size is not None:
            return self.input_size, False
        sizes = {img.shape[:2] for img in images}
        if len(sizes) == 1:
            h, w = sizes.pop()
            return (_round_up(w), _round_up(h)), True
        return DEFAULT_INPUT_SIZE, False

    def _letterbox(self, images: list[np.ndarray], size: tuple[int, int],
                   pad_only: bool) -> tuple[np.ndarray, np.ndarray]:
        """Images -> blob (B, 3, H, W) float32 normalized, scales (B, 2) network px per image px (x, y).

        Like SCRFD's detect: scale to fit keeping aspect (skipped when pad_only), pad bottom/right with
        black (pixel 0).
        """
        width, height = size
        mean, std = float(self.model.input_mean), float(self.model.input_std)
        blob = np.full((len(images), 3, height, width), (0.0 - mean) / std, np.float32)
        scales = np.ones((len(images), 2), np.float32)
        for i, img in enumerate(images):
            h, w = img.shape[:2]
            if pad_only or (h, w) == (height, width):
                new_w, new_h = w, h
                resized = img
            else:
                if h / w > height / width:
                    new_h, new_w = height, max(1, int(height * w / h))
                else:
                    new_w, new_h = width, max(1, int(width * h / w))
                resized = cv2.resize(img, (new_w, new_h))
            # Separate x and y scales: int() truncation makes them differ slightly.
            scales[i] = (new_w / w, new_h / h)
            blob[i, :, :new_h, :new_w] = (resized.transpose(2, 0, 1).astype(np.float32) - mean) / std
        return blob, scales

    # ---------------------------------------------------------------- decoding

    def _anchor_centers(self, height: int, width: int, stride: int) -> np.ndarray:
        """(h * w * A, 2) anchor centers (x = col * stride, y = row * stride), each repeated per anchor."""
        key = (height, width, stride)
        centers = self._centers.get(key)
        if centers is None:
            h, w = height // stride, width // stride
            centers = (np.stack(np.mgrid[:h, :w][::-1], axis=-1).astype(np.float32) * stride).reshape(-1, 2)
            if self.model._num_anchors > 1:
                centers = np.repeat(centers, self.model._num_anchors, axis=0)
            self._centers[key] = centers
        return centers

    def _decode(self, outs: list[np.ndarray], i: int, height: int, width: int,
                scale: np.ndarray) -> Detections:
        """Outputs of image i (rank-3 (B, A, C) arrays) -> its Detections in original image pixels."""
        fmc = self.model.fmc
        scores, boxes, kpss = [], [], []
        for idx, stride in enumerate(self.model._feat_stride_fpn):
            score = outs[idx][i].reshape(-1)
            pos = np.flatnonzero(score >= self.det_thresh)
            if pos.size == 0:
                continue
            centers = self._anchor_centers(height, width, stride)[pos]
            scores.append(score[pos])
            boxes.append(distance2bbox(centers, outs[idx + fmc][i][pos] * stride))
            kpss.append(distance2kps(centers, outs[idx + 2 * fmc][i][pos] * stride).reshape(-1, 5, 2))
        if not scores:
            return Detections.empty()
        score = np.concatenate(scores)
        order = np.argsort(-score, kind="stable")
        pre_det = np.hstack([np.concatenate(boxes), score[:, None]]).astype(np.float32)[order]
        kps = np.concatenate(kpss).astype(np.float32)[order]
        keep = np.asarray(self.model.nms(pre_det), dtype=np.int64)  # best score first
        det, kps = pre_det[keep], kps[keep]
        sx, sy = float(scale[0]), float(scale[1])
        boxes_px = det[:, :4] / np.array([sx, sy, sx, sy], np.float32)
        kps_px = kps / np.array([sx, sy], np.float32)
        return Detections(boxes_px.astype(np.float32), kps_px.astype(np.float32), det[:, 4].copy())

    # ---------------------------------------------------------------- public

    def detect(self, images: np.ndarray | Sequence[np.ndarray]) -> list[Detections]:
        """Detect faces in RGB uint8 images: a list of (H, W, 3) arrays or one (B, H, W, 3) array.

        Returns one Detections per image, in that image's pixels, best score first (empty when none).
        A batched detector runs the session once for the whole call; others run once per image.
        """
        imgs = self._as_image_list(images)
        if not imgs:
            return []
        (width, height), pad_only = self._network_size(imgs)
        blob, scales = self._letterbox(imgs, (width, height), pad_only)
        session, names, input_name = self.model.session, self.model.output_names, self.model.input_name
        if self.batched:
            outs = session.run(names, {input_name: blob})
        else:
            per_image = [session.run(names, {input_name: blob[i : i + 1]}) for i in range(len(imgs))]
            # Rank-2 (A, C) outputs have no batch axis: add it, then stack images along it.
            outs = [np.concatenate([o if o.ndim == 3 else o[None] for o in group])
                    for group in zip(*per_image)]
        return [self._decode(outs, i, height, width, scales[i]) for i in range(len(imgs))]

    def detect_tensor(self, images: torch.Tensor) -> list[Detections]:
        """Detect faces in a (B, 3, H, W) float tensor in [-1, 1] (any device; values outside are clamped).

        Converts to RGB uint8 without gradient and calls `detect`; coordinates are in the tensor's pixels.
        """
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"images must be a torch.Tensor (B, 3, H, W), got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be (B, 3, H, W) with 3 RGB channels, got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a float tensor in [-1, 1], got dtype {images.dtype}")
        with torch.no_grad():
            array = signed_to_rgb(images)
        return self.detect(array)

    def __repr__(self) -> str:
        return (f"FaceDetector({str(self.model_file)!r}, det_thresh={self.det_thresh}, "
                f"nms_thresh={self.model.nms_thresh}, input_size={self.input_size}, batched={self.batched})")
