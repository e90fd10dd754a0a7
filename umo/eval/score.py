"""Scoring generated images with the JUDGE (a face model independent of the reward), and aggregating.

Per generated image, with M references and the N faces the judge detects and can align in it (umo.metrics,
docs/method.md): ID-Sim per reference, ID-Conf per reference (only when N >= 2), ID-Match (mean Hungarian-assigned
similarity) and whether N == M (face-count accuracy). A detected face whose landmarks are degenerate
(`similarity_transforms` says invalid: coincident, collinear, non-finite) is not a face: it is dropped before
embedding, so it counts neither toward N >= 2 nor in the face count. A face partly outside the image is kept
and cropped with a black border, as the reward does (umo.reward.CROP_FILL).

Aggregation, the public evaluators' rule (bytedance/XVerse eval/tools/idip_face_score.py for ID-Sim,
bytedance/UMO eval/id_conf_xversebench.py for ID-Conf): ONE pooled mean over every (item, image, reference)
entry of the set, never a mean of item means:

    ID-Sim              every (item, image, reference): M entries per image (0 for a reference of an image
                        without faces)
    ID-Conf             the same entries, only from images with N >= 2 faces (an image with fewer adds none)
    ID-Match            every image (item, image) once: it is one value per image, not per reference
    face-count accuracy every image once, the share with N == M

An item's images share its M references (`ItemScore.identities`), so each image keeps the mean of its M
entries and stands for M of them: the pooled mean is sum(M * image mean) / sum(M) over the images (for ID-Conf,
over the images that have a value). Items with more references or more images weigh more, as in the
public scripts. The per-number-of-identities blocks pool the same way within their items. Then x the scale:
x100 for XVerseBench and our held-out set, x10 for OmniContext; ID-Match is scaled like ID-Sim, face-count
accuracy is a fraction.

Collision rate (identity collapse, beyond the paper): the share of images with >= 2 references and a face in
which two references' best faces (each row's argmax) are the same face; a fraction, over images.

Against a ground-truth target (the held-out set; umo.metrics): Sim(GT), the Hungarian-matched similarity of the
generated faces to the target's faces, and copy-paste (CP), per generated face. Both exist only for an image
whose faces, the target's faces and the references are equally many: elsewhere they are not measured (None),
and the set reports how many images were measured. Pooled like ID-Sim: an image stands for its M faces.

Reference face = the largest face the judge detects in each reference image. A reference image with no face
cannot be scored: its item is counted as `unscored` (with the reason), never silently averaged as zero.

Each face is embedded once: all reference faces of a batch in one judge run and all generated faces in another
(R + G embeddings), then one matrix product per image; never R x G re-embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from umo.faces.align import similarity_transforms
from umo.faces.detect import FaceDetector
from umo.faces.embed import OnnxRecognizer
from umo.faces.types import Detections
from umo.metrics import against_target, id_conf, id_match, id_sim

SCALES = {"xverse": 100.0, "heldout": 100.0, "omnicontext": 10.0}


# The rules behind a stored ImageScore: the face rule above and what the fields mean. A cached score of another
# version (umo.eval.run's work folder) is recomputed. 2: degenerate faces are no longer counted as faces; 3: collision;
# 4: Sim(GT) and copy-paste; 5: the faces' boxes, the similarities and the scored references are kept; 6: every
# judge of faces.judges scores every image.
SCORING_VERSION = 6


@dataclass
class ImageScore:
    """One generated image, unscaled. id_sim: mean over its M references; id_conf: mean over the references'
    entries, None without entries (N < 2); id_match: mean assigned similarity; faces: N; count_ok: N == M."""

    id_sim: float
    id_conf: float | None
    id_match: float
    faces: int
    count_ok: bool
    collision: bool | None = None
    """Two references' best faces are the same face (identity collapse); None with < 2 references or no face."""
    sim_gt: float | None = None
    """Sim(GT) against the item's target; None without a target or unless the face counts agree."""
    copy_paste: float | None = None
    """The mean CP of the image's faces; None where Sim(GT) is."""
    boxes: list[list[float]] | None = None
    """The judge's faces in the image, x0, y0, x1, y1 in pixels (for the pictures of the matching)."""
    sims: list[list[float]] | None = None
    """The (M, N) judge similarities of the references to those faces, rounded to 4 decimals."""


@dataclass
class ItemScore:
    item: str
    identities: int
    images: list[ImageScore] = field(default_factory=list)
    unscored: str | None = None  # why the item could not be scored (e.g. a reference without a face)
    seeds: list[int] = field(default_factory=list)  # of the images, when they were generated
    people: list[int] | None = None  # the scored references (indices into the item's references), row order

    @classmethod
    def from_dict(cls, d: dict) -> "ItemScore":
        """The inverse of `dataclasses.asdict` (work files, scores.jsonl; extra keys such as "model" are ignored)."""
        return cls(d["item"], d["identities"], [ImageScore(**s) for s in d["images"]], d["unscored"], d["seeds"],
                   d.get("people"))

    def mean(self, key: str) -> float | None:
        """The mean of an image value over this item's images (those that have one): the item alone, for
        reading and ranking items. Its images share M, so it equals its pooled mean; for sets, `aggregate`."""
        values = [getattr(i, key) for i in self.images]
        values = [float(v) for v in values if v is not None]
        return float(np.mean(values)) if values else None


def score_image(sim: np.ndarray) -> ImageScore:
    """(M, N) judge similarities of one generated image -> its scores (unscaled; no target: see score_item).

    >>> s = score_image(np.array([[0.8, 0.2], [0.6, 0.5]]))
    >>> round(s.id_sim, 4), round(s.id_conf, 4), round(s.id_match, 4), s.faces, s.count_ok, s.collision
    (0.7, 0.4583, 0.65, 2, True, True)
    """
    sim = np.asarray(sim, np.float64)
    m, n = sim.shape
    conf = [c for c in id_conf(sim) if c is not None]
    best = sim.argmax(axis=1) if m and n else np.zeros(0, int)
    collision = bool(len(set(best.tolist())) < m) if m >= 2 and n else None
    return ImageScore(float(np.mean(id_sim(sim))) if m else 0.0, float(np.mean(conf)) if conf else None,
                      id_match(sim), n, n == m, collision)


def score_item(item: str, references: np.ndarray, generated: Sequence[np.ndarray],
               target: np.ndarray | None = None, boxes: Sequence[np.ndarray] | None = None) -> ItemScore:
    """references (M, D) judge embeddings (one per identity); generated: per image its (N_i, D) face embeddings;
    target: the (T, D) face embeddings of the item's ground-truth image, when it has one; boxes: per image the
    (N_i, 4) boxes of those faces, kept with the similarities for the pictures of the matching."""
    references = np.asarray(references)
    out = ItemScore(item, len(references))
    for k, faces in enumerate(generated):
        faces = np.asarray(faces).reshape(len(faces), references.shape[1])
        sim = references @ faces.T
        score = score_image(sim)
        if boxes is not None:
            score.boxes = np.round(np.asarray(boxes[k], np.float64).reshape(-1, 4), 2).tolist()
            score.sims = np.round(sim.astype(np.float64), 4).tolist()
        if target is not None:
            score.sim_gt, cp = against_target(faces, target, references)
            score.copy_paste = None if cp is None else float(np.mean(cp))
        out.images.append(score)
    return out


def aggregate(items: Sequence[ItemScore], scale: float) -> dict:
    """Set-level metrics, pooled over (item, image, reference) entries (see the module docstring), and the same
    per number of identities.

    Item a (2 people): ID-Sim entries 0.5, 0.5 and 0.7, 0.7; ID-Conf 0.5, 0.5 (its 2nd image has 1 face).
    Item b (1 person): ID-Sim 0.9. ID-Sim = (0.5 + 0.5 + 0.7 + 0.7 + 0.9) / 5 = 0.66 (item means: 0.75);
    ID-Match over the 3 images (0.4 + 0.3 + 0.9) / 3; face count 2 of 3 images.

    >>> a = ItemScore("a", 2, [ImageScore(0.5, 0.5, 0.4, 2, True), ImageScore(0.7, None, 0.3, 1, False)])
    >>> b = ItemScore("b", 1, [ImageScore(0.9, None, 0.9, 1, True)])
    >>> r = aggregate([a, b], 100)
    >>> r["id_sim"], r["id_conf"], r["id_match"], r["face_count_accuracy"], r["items"]
    (66.0, 50.0, 53.3333, 0.6667, 2)
    >>> r["by_identities"]["2"]["id_sim"]
    60.0
    """
    scored = [i for i in items if i.unscored is None and i.images]

    def block(group: Sequence[ItemScore]) -> dict:
        images = [(i.identities, s) for i in group for s in i.images]

        def pooled(entries: list[tuple[float, int]], factor: float) -> float | None:
            """(image value, number of entries it stands for) pairs -> the mean over all entries x factor."""
            n = sum(w for _, w in entries)
            return round(sum(v * w for v, w in entries) / n * factor, 4) if n else None

        return {"items": len(group),
                "id_sim": pooled([(s.id_sim, m) for m, s in images], scale),
                "id_conf": pooled([(s.id_conf, m) for m, s in images if s.id_conf is not None], scale),
                "id_match": pooled([(s.id_match, 1) for _, s in images], scale),
                "face_count_accuracy": pooled([(float(s.count_ok), 1) for _, s in images], 1.0),
                "collision_rate": pooled([(float(s.collision), 1) for _, s in images if s.collision is not None],
                                         1.0),
                # against a ground truth, where the face counts agree (an image stands for its M faces)
                "sim_gt": pooled([(s.sim_gt, m) for m, s in images if s.sim_gt is not None], scale),
                "copy_paste": pooled([(s.copy_paste, m) for m, s in images if s.copy_paste is not None], 1.0),
                "gt_images_measured": sum(s.sim_gt is not None for _, s in images)}

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


def entry_sums(items: Sequence[ItemScore], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Per item, (sum of its (image, reference) entries of `key`, their number), pooled as `aggregate` pools:
    an image's value stands for its M references' entries (ID-Sim: every image; ID-Conf: images with a value).
    face_count_accuracy, id_match and collision_rate count once per image (collision: where it is defined).
    items: a model's `ItemScore`s in one fixed order."""
    per_image = key in ("face_count_accuracy", "id_match", "collision_rate")
    attr = {"face_count_accuracy": "count_ok", "collision_rate": "collision"}.get(key, key)
    sums, counts = np.zeros(len(items)), np.zeros(len(items))
    for j, item in enumerate(items):
        for image in item.images:
            v = getattr(image, attr)
            if v is None:
                continue
            w = 1 if per_image else item.identities
            sums[j] += float(v) * w
            counts[j] += w
    return sums, counts


PAIRED_KEYS = ("id_sim", "id_conf", "face_count_accuracy", "collision_rate", "sim_gt", "copy_paste")
SCALED = ("id_sim", "id_conf", "id_match", "sim_gt")  # x the benchmark's scale; the others are fractions or CP


def paired_interval(a: Sequence[ItemScore], b: Sequence[ItemScore], key: str, *, scale: float,
                    level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> dict | None:
    """Model a minus model b on `key`, pooled as `aggregate` pools, with a paired item-bootstrap interval.

    Both models were scored on the same items with the same image seeds, so an item is the unit of resampling:
    each resample draws items with replacement and recomputes BOTH pooled means on the same draw (the pairing
    cancels what the items share). The percentile interval at `level`; deterministic for a seed. ID-Conf pools
    only images with a value, so a resample where a side has none is skipped. None when a side has no entry.

    Items a (a: 0.6, 0.6; b: 0.5, 0.5) and b (a: 0.2, 0.2; b: 0.3, 0.3), one reference each: the difference is
    (0.8 - 0.8) / 2 = 0; resamples {a, a}: +0.1, {b, b}: -0.1, {a, b}: 0, so the interval lies in [-10, +10] x100.

    >>> x = [ItemScore("a", 1, [ImageScore(0.6, None, 0.6, 1, True)] * 2),
    ...      ItemScore("b", 1, [ImageScore(0.2, None, 0.2, 1, True)] * 2)]
    >>> y = [ItemScore("a", 1, [ImageScore(0.5, None, 0.5, 1, True)] * 2),
    ...      ItemScore("b", 1, [ImageScore(0.3, None, 0.3, 1, True)] * 2)]
    >>> r = paired_interval(x, y, "id_sim", scale=100.0)
    >>> r["difference"], -10.0 <= r["lower"] <= 0.0 <= r["upper"] <= 10.0, r["items"]
    (0.0, True, 2)
    """
    by_b = {i.item: i for i in b if i.unscored is None and i.images}
    pairs = [(i, by_b[i.item]) for i in a if i.unscored is None and i.images and i.item in by_b]
    sa, ca = entry_sums([p for p, _ in pairs], key)
    sb, cb = entry_sums([q for _, q in pairs], key)
    if not pairs or ca.sum() == 0 or cb.sum() == 0:
        return None
    factor = scale if key in SCALED else 1.0
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(pairs), size=(n_boot, len(pairs)))
    na, nb = ca[draws].sum(axis=1), cb[draws].sum(axis=1)
    ok = (na > 0) & (nb > 0)
    boot = (sa[draws].sum(axis=1)[ok] / na[ok] - sb[draws].sum(axis=1)[ok] / nb[ok]) * factor
    tail = (1 - level) / 2 * 100
    return {"difference": round(float(sa.sum() / ca.sum() - sb.sum() / cb.sum()) * factor, 4),
            "lower": round(float(np.percentile(boot, tail)), 4), "upper": round(float(np.percentile(boot, 100 - tail)), 4),
            "level": level, "items": len(pairs), "resamples": int(ok.sum()), "method": "paired item bootstrap"}


def largest_face(boxes: np.ndarray) -> int | None:
    """Index of the largest box (area), None when there is none."""
    if len(boxes) == 0:
        return None
    wh = np.clip(boxes[:, 2:4] - boxes[:, 0:2], 0, None)
    return int(np.argmax(wh[:, 0] * wh[:, 1]))


def largest_only(det):
    """The `Detections` holding only the largest face of `det` (empty when it has none)."""
    k = largest_face(det.boxes)
    keep = slice(0, 0) if k is None else slice(k, k + 1)
    return Detections(det.boxes[keep], det.landmarks[keep], det.scores[keep])


def alignable_only(det):
    """The `Detections` holding only the faces of `det` whose landmarks can be aligned (not degenerate); a face
    partly outside the image stays (the reward keeps it too)."""
    _, ok = similarity_transforms(np.asarray(det.landmarks).reshape(-1, 5, 2))
    if ok.all():
        return det
    return Detections(det.boxes[ok], det.landmarks[ok], det.scores[ok])


class Judge:
    """The evaluation face pipeline: the detector plus a judge recognizer (never the reward's embedder)."""

    def __init__(self, detector, recognizer, *, batch: int = 16) -> None:
        self.detector, self.recognizer, self.batch = detector, recognizer, batch

    @classmethod
    def from_config(cls, faces) -> "Judge":
        """The gate's judge (the first of faces.judges)."""
        return next(iter(judges_from_config(faces).values()))

    def detect(self, images: Sequence[np.ndarray]) -> list:
        """RGB uint8 images -> their `Detections` of alignable faces: one detector call per batch of same-size
        images; faces with degenerate landmarks are dropped (see the module docstring)."""
        out: list = [None] * len(images)
        by_size: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            by_size.setdefault(np.asarray(img).shape, []).append(i)
        for idx in by_size.values():
            for k in range(0, len(idx), self.batch):
                chunk = idx[k:k + self.batch]
                for i, det in zip(chunk, self.detector.detect([np.asarray(images[i]) for i in chunk])):
                    out[i] = alignable_only(det)
        return out

    def embed(self, images: Sequence[np.ndarray], detections: Sequence) -> list[np.ndarray]:
        """Every given face of every image embedded once, all together: per image (K, D)."""
        return self.recognizer.embed([np.asarray(img) for img in images], detections)

    def faces(self, images: Sequence[np.ndarray], detections: Sequence | None = None
              ) -> list[tuple[np.ndarray, np.ndarray]]:
        """RGB uint8 images -> per image (boxes (K, 4), embeddings (K, D)) of every alignable detected face.
        detections: this judge's `detect(images)`, when a caller already has them (judges sharing a detector)."""
        dets = self.detect(images) if detections is None else detections
        return [(det.boxes, emb) for det, emb in zip(dets, self.embed(images, dets))]

    def target(self, image: np.ndarray, detections: Sequence | None = None) -> np.ndarray:
        """A ground-truth image's (T, D) embeddings of every alignable face (Sim(GT), copy-paste)."""
        return self.faces([image], detections)[0][1]

    def references(self, images: Sequence[np.ndarray], detections: Sequence | None = None
                   ) -> tuple[np.ndarray, list[int]]:
        """Each reference image's largest alignable face embedding (R, D), and the indices of images with no
        such face (their rows are zero). Only the largest face of each image is embedded."""
        largest = [largest_only(det) for det in (self.detect(images) if detections is None else detections)]
        missing = [r for r, det in enumerate(largest) if len(det) == 0]
        emb = self.embed(images, largest)
        dim = next((e.shape[1] for e in emb if len(e)), 0)
        out = np.zeros((len(images), dim), np.float32)
        for r, e in enumerate(emb):
            if len(e):
                out[r] = e[0]
        return out, missing


def judges_from_config(faces) -> dict[str, Judge]:
    """Every judge of faces.judges by name, in order (the first decides the gate), sharing one detector."""
    detector = FaceDetector.from_config(faces.detector, providers=faces.providers)
    return {j.label: Judge(detector, OnnxRecognizer.from_model_root(j.root, j.pack, providers=faces.providers))
            for j in faces.judges}
