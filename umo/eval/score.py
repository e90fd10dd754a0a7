"""Scoring generated images with the JUDGE (a face model independent of the reward), and aggregating.

Per generated image, with M references and the N faces the judge detects in it (umo.metrics, PAPER.md):
ID-Sim per reference, ID-Conf per reference (only when N >= 2), ID-Match (mean Hungarian-assigned
similarity) and whether N == M (face-count accuracy).

Aggregation, the same for every set; only the scale differs:

    image  ID-Sim = mean over references; ID-Conf = mean over the references that have an entry (none: no
           value); ID-Match; face count correct (0/1)
    item   the mean over its images (a XVerseBench grid has 4); ID-Conf over the images that have a value
    set    the mean over items (ID-Conf over the items that have a value), times the scale:
           x100 for XVerseBench and our held-out set, x10 for OmniContext. ID-Match is scaled like ID-Sim;
           face-count accuracy is a fraction.

Reference face = the largest face the judge detects in each reference image. A reference image with no face
cannot be scored: its item is counted as `unscored` (with the reason), never silently averaged as zero.

Each face is embedded once: all reference faces of a batch in one judge run and all generated faces in another
(R + G embeddings), then one matrix product per image; never R x G re-embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from umo.metrics import id_conf, id_match, id_sim

SCALES = {"xverse": 100.0, "heldout": 100.0, "omnicontext": 10.0}


@dataclass
class ImageScore:
    id_sim: float
    id_conf: float | None
    id_match: float
    faces: int
    count_ok: bool


@dataclass
class ItemScore:
    item: str
    identities: int
    images: list[ImageScore] = field(default_factory=list)
    unscored: str | None = None  # why the item could not be scored (e.g. a reference without a face)
    seeds: list[int] = field(default_factory=list)  # of the images, when they were generated

    def mean(self, key: str) -> float | None:
        values = [getattr(i, key) for i in self.images]
        values = [float(v) for v in values if v is not None]
        return float(np.mean(values)) if values else None


def score_image(sim: np.ndarray) -> ImageScore:
    """(M, N) judge similarities of one generated image -> its scores (unscaled).

    >>> s = score_image(np.array([[0.8, 0.2], [0.6, 0.5]]))
    >>> round(s.id_sim, 4), round(s.id_conf, 4), round(s.id_match, 4), s.faces, s.count_ok
    (0.7, 0.4583, 0.65, 2, True)
    """
    sim = np.asarray(sim, np.float64)
    m, n = sim.shape
    conf = [c for c in id_conf(sim) if c is not None]
    return ImageScore(float(np.mean(id_sim(sim))) if m else 0.0, float(np.mean(conf)) if conf else None,
                      id_match(sim), n, n == m)


def score_item(item: str, references: np.ndarray, generated: Sequence[np.ndarray]) -> ItemScore:
    """references (M, D) judge embeddings (one per identity); generated: per image its (N_i, D) face embeddings."""
    out = ItemScore(item, len(references))
    for faces in generated:
        out.images.append(score_image(np.asarray(references) @ np.asarray(faces).T if len(faces)
                                      else np.zeros((len(references), 0))))
    return out


def aggregate(items: Sequence[ItemScore], scale: float) -> dict:
    """Set-level metrics (see the module docstring) and the same per number of identities.

    >>> a = ItemScore("a", 2, [ImageScore(0.5, 0.5, 0.4, 2, True), ImageScore(0.7, None, 0.3, 1, False)])
    >>> b = ItemScore("b", 1, [ImageScore(0.9, None, 0.9, 1, True)])
    >>> r = aggregate([a, b], 100)
    >>> r["id_sim"], r["id_conf"], r["id_match"], r["face_count_accuracy"], r["items"]
    (75.0, 50.0, 62.5, 0.75, 2)
    >>> r["by_identities"]["2"]["id_sim"]
    60.0
    """
    scored = [i for i in items if i.unscored is None and i.images]

    def block(group: Sequence[ItemScore]) -> dict:
        def mean(key: str, factor: float) -> float | None:
            values = [v for v in (i.mean(key) for i in group) if v is not None]
            return round(float(np.mean(values)) * factor, 4) if values else None

        return {"items": len(group), "id_sim": mean("id_sim", scale), "id_conf": mean("id_conf", scale),
                "id_match": mean("id_match", scale), "face_count_accuracy": mean("count_ok", 1.0)}

    out = block(scored)
    out["scale"] = scale
    out["unscored"] = len(items) - len(scored)
    sizes = sorted({i.identities for i in scored})
    out["by_identities"] = {str(n): block([i for i in scored if i.identities == n]) for n in sizes}
    # The evidence behind the means, which the approval gate requires: generated images scored, faces the judge
    # found in them, and (item, image, reference) entries scored (a reference in an image without faces counts).
    out["images_scored"] = sum(len(i.images) for i in scored)
    out["faces_scored"] = sum(s.faces for i in scored for s in i.images)
    out["references_scored"] = sum(i.identities * len(i.images) for i in scored)
    return out


def largest_face(boxes: np.ndarray) -> int | None:
    """Index of the largest box (area), None when there is none."""
    if len(boxes) == 0:
        return None
    wh = np.clip(boxes[:, 2:4] - boxes[:, 0:2], 0, None)
    return int(np.argmax(wh[:, 0] * wh[:, 1]))


def largest_only(det):
    """The `Detections` holding only the largest face of `det` (empty when it has none)."""
    from umo.faces.types import Detections

    k = largest_face(det.boxes)
    keep = slice(0, 0) if k is None else slice(k, k + 1)
    return Detections(det.boxes[keep], det.landmarks[keep], det.scores[keep])


class Judge:
    """The evaluation face pipeline: the detector plus the judge recognizer (never the reward's embedder)."""

    def __init__(self, detector, recognizer, *, batch: int = 16) -> None:
        self.detector, self.recognizer, self.batch = detector, recognizer, batch

    @classmethod
    def from_config(cls, faces) -> "Judge":
        from umo.faces.detect import FaceDetector
        from umo.faces.embed import OnnxRecognizer

        return cls(FaceDetector.from_config(faces.detector),
                   OnnxRecognizer.from_model_root(faces.judge.root, faces.judge.pack))

    def detect(self, images: Sequence[np.ndarray]) -> list:
        """RGB uint8 images -> their `Detections`: one detector call per batch of same-size images."""
        out: list = [None] * len(images)
        by_size: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            by_size.setdefault(np.asarray(img).shape, []).append(i)
        for idx in by_size.values():
            for k in range(0, len(idx), self.batch):
                chunk = idx[k:k + self.batch]
                for i, det in zip(chunk, self.detector.detect([np.asarray(images[i]) for i in chunk])):
                    out[i] = det
        return out

    def embed(self, images: Sequence[np.ndarray], detections: Sequence) -> list[np.ndarray]:
        """Every given face of every image embedded once, all together: per image (K, D)."""
        return self.recognizer.embed([np.asarray(img) for img in images], detections)

    def faces(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """RGB uint8 images -> per image (boxes (K, 4), embeddings (K, D)) of every detected face."""
        dets = self.detect(images)
        return [(det.boxes, emb) for det, emb in zip(dets, self.embed(images, dets))]

    def references(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[int]]:
        """Each reference image's largest face embedding (R, D), and the indices of images with no face
        (their rows are zero). Only the largest face of each image is embedded."""
        largest = [largest_only(det) for det in self.detect(images)]
        missing = [r for r, det in enumerate(largest) if len(det) == 0]
        emb = self.embed(images, largest)
        dim = next((e.shape[1] for e in emb if len(e)), 0)
        out = np.zeros((len(images), dim), np.float32)
        for r, e in enumerate(emb):
            if len(e):
                out[r] = e[0]
        return out, missing
