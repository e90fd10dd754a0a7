"""The face index: every face of every raw image detected and embedded once, cached by image content.

Cache: `<cache>/<models key>/<sha[:2]>/<sha>.safetensors` per image (arrays, plus the image size and
conversions in the header; no pickle anywhere), written atomically. A damaged entry is recomputed. The models key hashes the detector and embedder files and the
detection settings, so another model never reuses an entry. A re-run after adding images computes only the new
ones; unchanged images are neither decoded nor detected again (the cache also records what the scan learnt).

Per image: boxes (K, 4), landmarks (K, 5, 2), scores (K,), embeddings (K, D) L2-normalized (the REWARD
embedder, so data prep's reference embeddings are exactly what the reward compares with), the image size and
the conversions the decoder applied.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from umo.config import VideoConfig
from umo.data.ingest import DEFAULT_MAX_CAPTION_CHARS, scan_collection
from umo.faces.align import similarity_transforms
from umo.faces.types import Detections
from umo.images import to_signed
from umo.io import sha256_file
from umo.reward import MatchingReward

log = logging.getLogger(__name__)


@dataclass
class ImageFaces:
    sha256: str
    width: int
    height: int
    conversions: list[str]
    boxes: np.ndarray
    landmarks: np.ndarray
    scores: np.ndarray
    embeddings: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def sizes(self) -> np.ndarray:
        return face_sizes(self.boxes)


def face_sizes(boxes: np.ndarray) -> np.ndarray:
    """Face side in pixels: the geometric mean of box width and height, per (x1, y1, x2, y2) box."""
    wh = np.asarray(boxes)[:, 2:4] - np.asarray(boxes)[:, 0:2]
    return np.sqrt(np.clip(wh[:, 0], 0, None) * np.clip(wh[:, 1], 0, None))


def models_key(detector_files: Sequence[Path], embedder_file: Path, settings: dict) -> str:
    """Hash of the model files' bytes and the detection settings."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for f in [*sorted(detector_files), embedder_file]:
        h.update(sha256_file(f).encode())
    return h.hexdigest()[:16]


class FaceCache:
    def __init__(self, root: Path, key: str) -> None:
        self.root = Path(root) / key

    def path(self, sha: str) -> Path:
        return self.root / sha[:2] / f"{sha}.safetensors"

    def get(self, sha: str) -> ImageFaces | None:
        path = self.path(sha)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), "np") as f:
                meta = json.loads(f.metadata()["meta"])
                arrays = [f.get_tensor(k) for k in ("boxes", "landmarks", "scores", "embeddings")]
            return ImageFaces(sha, meta["width"], meta["height"], meta["conversions"], *arrays)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
            log.warning("face cache %s unreadable (%s): recomputing", path, err)  # never trusted, recomputed
            return None

    def put(self, faces: ImageFaces) -> None:
        path = self.path(faces.sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        meta = json.dumps({"width": faces.width, "height": faces.height, "conversions": faces.conversions})
        arrays = {"boxes": faces.boxes, "landmarks": faces.landmarks, "scores": faces.scores,
                  "embeddings": faces.embeddings}
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}, str(tmp),
                  metadata={"meta": meta})
        os.replace(tmp, path)


class FaceEmbedder:
    """Detect (numpy, batched by image size) and embed (aligned 112 crops, torch) without gradients."""

    def __init__(self, detector, embedder, *, batch: int = 16, device: str | torch.device = "cpu") -> None:
        self.detector = detector
        self.reward = MatchingReward(detector, embedder, max_faces=64).to(device).eval()
        self.batch = batch
        self.device = torch.device(device)
        with torch.no_grad():
            self.dim = int(self.reward.embed(torch.zeros(1, 3, 112, 112, device=self.device)).shape[1])

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> list[tuple[Detections, np.ndarray]]:
        """RGB uint8 images -> per image its detections and (K, D) embeddings (faces with degenerate
        landmarks are dropped from both)."""
        out: list[tuple[Detections, np.ndarray] | None] = [None] * len(images)
        by_size: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            by_size.setdefault(img.shape, []).append(i)
        for idx in by_size.values():
            for k in range(0, len(idx), self.batch):
                chunk = idx[k:k + self.batch]
                dets = self.detector.detect([images[i] for i in chunk])
                tensor = torch.from_numpy(np.stack([images[i] for i in chunk])).permute(0, 3, 1, 2)
                tensor = to_signed(tensor.to(self.device))
                kept = []
                for det in dets:
                    _, valid = similarity_transforms(det.landmarks, image_hw=tuple(tensor.shape[2:]))
                    kept.append(Detections(det.boxes[valid], det.landmarks[valid], det.scores[valid]))
                faces, owner, _ = self.reward.align(tensor, kept)
                emb = (self.reward.embed(faces).cpu().numpy() if faces.shape[0]
                       else np.zeros((0, self.dim), np.float32))
                owner = owner.cpu().numpy()
                for j, i in enumerate(chunk):
                    out[i] = (kept[j], emb[owner == j].astype(np.float32))
        return out  # type: ignore[return-value]


def index_collection(raw: str | Path, *, extensions: list[str], max_pixels: int, min_side: int, cache: FaceCache,
                     embedder: FaceEmbedder, max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS,
                     video: VideoConfig | None = None, shard: tuple[int, int] | None = None):
    """Scan the raw collection and index its faces: (ScanResult, {sha256: ImageFaces}, {"computed", "cached"}).

    Each new image is decoded once (by the scan) and handed to the detector in batches; cached ones are neither
    decoded nor detected. shard (rank, world): this process's share of the files only (`scan_collection`).
    """
    faces: dict[str, ImageFaces] = {}
    pending: list[tuple] = []
    counts = {"computed": 0, "cached": 0}
    bar = tqdm(desc="face index", unit="img", disable=None)

    def flush() -> None:
        if not pending:
            return
        for (img, _), (det, emb) in zip(pending, embedder([rgb for _, rgb in pending])):
            entry = ImageFaces(img.sha256, img.width, img.height, list(img.conversions), det.boxes, det.landmarks,
                               det.scores, emb)
            cache.put(entry)
            faces[img.sha256] = entry
        counts["computed"] += len(pending)
        bar.update(len(pending))
        pending.clear()

    def on_decoded(img, rgb) -> None:
        pending.append((img, rgb))
        if len(pending) >= embedder.batch:
            flush()

    def known(sha: str):
        entry = cache.get(sha)
        if entry is None:
            return None
        faces[sha] = entry
        counts["cached"] += 1
        bar.update(1)
        return entry.width, entry.height, entry.conversions

    scan = scan_collection(raw, extensions=extensions, max_pixels=max_pixels, min_side=min_side, known=known,
                           on_decoded=on_decoded, max_caption_chars=max_caption_chars, video=video, shard=shard)
    flush()
    bar.close()
    log.info("face index: %d images computed, %d from the cache, %d faces", counts["computed"], counts["cached"],
             sum(len(faces[i.sha256]) for i in scan.images))
    return scan, faces, counts
