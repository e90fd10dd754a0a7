"""The toy world's face detector: a small CNN trained on rendered scenes, exported in SCRFD's ONNX layout.

It loads through the real `umo.faces.detect.FaceDetector` (insightface routes it to SCRFD), so the toy
world exercises exactly the code path real model packs take.

Layout (SCRFD, see `umo.toy.onnx_export.export_detector_onnx`): strides 8 / 16 / 32, 2 anchors per cell (the
two anchors of a cell carry the same prediction; NMS drops the duplicate), bbox and keypoints as distances
in stride units from anchor centres (x = col * stride, y = row * stride).

Training (FCOS-style assignment): each face goes to the level(s) of its box size (`LEVEL_RANGES`); cells of
that level whose centre lies inside the box and within `CENTER_RADIUS` strides of the box centre are
positives. Losses: sigmoid focal loss on score logits (all cells, normalized by the number of positives),
L1 on box distances and smooth-L1 on landmark offsets (positives only, stride units).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from umo.faces.detect import FaceDetector
from umo.toy.config import ToyDetectorConfig
from umo.toy.onnx_export import (
    SCRFD_ANCHORS,
    SCRFD_INPUT_MEAN,
    SCRFD_INPUT_STD,
    SCRFD_STRIDES,
    export_detector_onnx,
)
from umo.toy.world.identity import Identity, make_identity
from umo.toy.world.render import MAX_FACES, Scene, render_scene

logger = logging.getLogger(__name__)

DETECTOR_FILE = "det_toy_scrfd.onnx"  # the name says it is the toy world's, not a real SCRFD
SCENE_SIZE = (256, 256)  # (height, width) of training scenes
# Face-box size ranges (max side, px) per stride; faces are 40..110 px on 256 px scenes. The ranges overlap
# so that a face near a boundary is a positive on both levels: with disjoint ranges such faces got
# scores just under 0.5 on either level (recall 0.954 -> misses all within 5 px of a boundary).
LEVEL_RANGES = {8: (0.0, 64.0), 16: (48.0, 112.0), 32: (88.0, float("inf"))}
CENTER_RADIUS = 1.5  # positives lie within this many strides of the box centre (and inside the box)
FLIP_KPS = [1, 0, 2, 4, 3]  # landmark order after a horizontal flip (eyes and mouth corners swap)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class ToyDetector(nn.Module):
    """Strided conv backbone -> feature maps at strides 8/16/32 -> top-down FPN-lite -> one head per level.

    forward: (B, 3, H, W) normalized (pixel - 127.5) / 128, H and W multiples of 32 -> SCRFD's 9 outputs
    (scores in [0, 1] after sigmoid, then bbox, then kps; each (B, H/s * W/s * 2, C)).
    forward_raw: the same input -> (B, N, 15) logits/distances per cell, N = sum of H/s * W/s over strides
    (stride-8 cells first, row-major), channels [score logit, 4 box distances, 10 landmark offsets].
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(_conv(3, w // 2, 2), _conv(w // 2, w, 2))  # stride 4
        self.c3 = nn.Sequential(_conv(w, w * 3 // 2, 2), _conv(w * 3 // 2, w * 3 // 2))  # stride 8
        self.c4 = nn.Sequential(_conv(w * 3 // 2, w * 2, 2), _conv(w * 2, w * 2))  # stride 16
        self.c5 = nn.Sequential(_conv(w * 2, w * 3, 2), _conv(w * 3, w * 3))  # stride 32
        f = w * 3 // 2
        self.lat = nn.ModuleList([nn.Conv2d(c, f, 1) for c in (w * 3 // 2, w * 2, w * 3)])
        self.heads = nn.ModuleList([nn.Sequential(_conv(f, f), nn.Conv2d(f, 15, 1)) for _ in SCRFD_STRIDES])
        # Start every cell at a low face probability (focal-loss prior 0.01) so early training is stable.
        for head in self.heads:
            nn.init.constant_(head[-1].bias, 0.0)
            nn.init.constant_(head[-1].bias[0], -4.6)

    def _levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        c3 = self.c3(self.stem(x))
        c4 = self.c4(c3)
        c5 = self.c5(c4)
        p5 = self.lat[2](c5)
        p4 = self.lat[1](c4) + F.interpolate(p5, scale_factor=2.0, mode="nearest")
        p3 = self.lat[0](c3) + F.interpolate(p4, scale_factor=2.0, mode="nearest")
        # (B, 15, h, w) -> (B, h*w, 15), row-major cells like insightface's anchor centres
        return [head(p).flatten(2).transpose(1, 2) for head, p in zip(self.heads, (p3, p4, p5))]

    def forward_raw(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._levels(x), dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        levels = [lv.repeat_interleave(SCRFD_ANCHORS, dim=1) for lv in self._levels(x)]
        scores = [torch.sigmoid(lv[..., :1]) for lv in levels]
        return (*scores, *[lv[..., 1:5] for lv in levels], *[lv[..., 5:15] for lv in levels])


# ---------------------------------------------------------------- targets (pure numpy)


def cell_centers(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) cell centres (x = col * s, y = row * s) and (N,) strides, strides 8/16/32 in that order."""
    centers, strides = [], []
    for s in SCRFD_STRIDES:
        h, w = height // s, width // s
        centers.append((np.stack(np.mgrid[:h, :w][::-1], axis=-1).astype(np.float32) * s).reshape(-1, 2))
        strides.append(np.full(h * w, s, np.float32))
    return np.concatenate(centers), np.concatenate(strides)


def assign_targets(boxes: np.ndarray, landmarks: np.ndarray, centers: np.ndarray,
                   strides: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Training targets for one image.

    boxes (K, 4) x1 y1 x2 y2 px, landmarks (K, 5, 2) px, centers (N, 2) px, strides (N,).
    Returns (positive (N,) bool, target (N, 14) float32: box distances l t r b then landmark offsets
    x0 y0 ... x4 y4, all relative to the cell centre in stride units; zeros where not positive).
    A cell claimed by two faces goes to the smaller one.
    """
    n = centers.shape[0]
    pos = np.zeros(n, bool)
    target = np.zeros((n, 14), np.float32)
    best_area = np.full(n, np.inf, np.float32)
    for box, kps in zip(boxes, landmarks):
        x1, y1, x2, y2 = (float(v) for v in box)
        size, area = max(x2 - x1, y2 - y1), (x2 - x1) * (y2 - y1)
        gcx, gcy = (x1 + x2) / 2, (y1 + y2) / 2
        cx, cy = centers[:, 0], centers[:, 1]
        inside = (cx > x1) & (cx < x2) & (cy > y1) & (cy < y2)
        for s in (s for s in SCRFD_STRIDES if LEVEL_RANGES[s][0] <= size < LEVEL_RANGES[s][1]):
            on_level = strides == s
            near = (np.abs(cx - gcx) <= CENTER_RADIUS * s) & (np.abs(cy - gcy) <= CENTER_RADIUS * s)
            take = on_level & inside & near & (area < best_area)
            if not take.any():  # tiny box between cells: the nearest cell of its level
                d = np.where(on_level, (cx - gcx) ** 2 + (cy - gcy) ** 2, np.inf)
                take = np.zeros(n, bool)
                take[int(np.argmin(d))] = True
            c = centers[take]
            st = strides[take][:, None]
            dist = np.stack([c[:, 0] - x1, c[:, 1] - y1, x2 - c[:, 0], y2 - c[:, 1]], axis=1)
            offs = (kps[None, :, :] - c[:, None, :]).reshape(-1, 10)
            target[take] = np.concatenate([dist, offs], axis=1) / st
            pos[take] = True
            best_area[take] = area
    return pos, target


def flip_scene(image: np.ndarray, boxes: np.ndarray, landmarks: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mirror an (H, W, 3) image left-right with its boxes (K, 4) and landmarks (K, 5, 2) (pixel centres)."""
    w = image.shape[1]
    fb = np.stack([w - 1 - boxes[:, 2], boxes[:, 1], w - 1 - boxes[:, 0], boxes[:, 3]], axis=1)
    fk = landmarks[:, FLIP_KPS].copy()
    fk[..., 0] = w - 1 - fk[..., 0]
    return image[:, ::-1], fb.astype(np.float32), fk.astype(np.float32)


def detection_loss(raw: torch.Tensor, pos: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """raw (B, N, 15) from forward_raw, pos (B, N) bool, target (B, N, 14) -> {'score','box','kps','total'}.

    score: sigmoid focal loss (alpha 0.25, gamma 2) summed over all cells / number of positives;
    box: L1 on distances, kps: smooth-L1 (beta 0.1) on offsets, both means over positives (stride units).
    """
    num_pos = pos.sum().clamp(min=1).float()
    logits = raw[..., 0]
    label = pos.float()
    ce = F.binary_cross_entropy_with_logits(logits, label, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * label + (1 - p) * (1 - label)
    alpha = 0.25 * label + 0.75 * (1 - label)
    score = (alpha * (1 - p_t) ** 2 * ce).sum() / num_pos
    box = F.l1_loss(raw[..., 1:5][pos], target[..., :4][pos], reduction="sum") / (4 * num_pos)
    kps = F.smooth_l1_loss(raw[..., 5:15][pos], target[..., 4:][pos], beta=0.1, reduction="sum") / (10 * num_pos)
    return {"score": score, "box": box, "kps": kps, "total": score + 2.0 * box + kps}


# ---------------------------------------------------------------- data


def random_scene(world_seed: int, ids: range, rng: np.random.Generator,
                 cache: dict[int, Identity]) -> Scene:
    """A SCENE_SIZE scene of 1..4 distinct identities drawn from `ids` (`cache` keeps built identities)."""
    k = int(rng.integers(1, MAX_FACES + 1))
    chosen = rng.choice(len(ids), size=min(k, len(ids)), replace=False)
    people = []
    for j in chosen:
        i = ids[int(j)]
        if i not in cache:
            cache[i] = make_identity(world_seed, i)
        people.append(cache[i])
    return render_scene(world_seed, people, rng, SCENE_SIZE)


def render_training_set(world_seed: int, ids: range, n_scenes: int, seed: int
                        ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Pre-render n_scenes scenes of identities `ids`: images (n, H, W, 3) uint8, boxes and landmarks lists."""
    rng = np.random.default_rng(seed)
    cache: dict[int, Identity] = {}
    images = np.empty((n_scenes, *SCENE_SIZE, 3), np.uint8)
    boxes, kps = [], []
    for i in tqdm(range(n_scenes), desc="render detector scenes", leave=False, disable=None):
        sc = random_scene(world_seed, ids, rng, cache)
        images[i] = sc.image
        boxes.append(sc.boxes)
        kps.append(sc.landmarks)
    return images, boxes, kps


def to_detector_input(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 RGB -> (B, 3, H, W) float32 (pixel - 127.5) / 128."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return (x - SCRFD_INPUT_MEAN) / SCRFD_INPUT_STD


# ---------------------------------------------------------------- train / evaluate / build


def train_detector(world_seed: int, *, train_ids: range, config: ToyDetectorConfig,
                   log_every: int = 100) -> ToyDetector:
    """Train a ToyDetector on pre-rendered scenes of `train_ids` (random mirror); deterministic per config.

    config.n_scenes scenes are rendered once from default_rng(seed * 7919 + world_seed); the model init
    and batch order come from torch.manual_seed(config.seed). Returns the model in eval mode.
    """
    seed, steps, batch = config.seed, config.steps, config.batch
    torch.manual_seed(seed)
    n_scenes = config.n_scenes
    t0 = time.perf_counter()
    images, boxes, kps = render_training_set(world_seed, train_ids, n_scenes, seed=seed * 7919 + world_seed)
    logger.info("rendered %d detector training scenes in %.1f s", n_scenes, time.perf_counter() - t0)
    centers, strides = cell_centers(*SCENE_SIZE)
    targets = [assign_targets(b, k, centers, strides) for b, k in zip(boxes, kps)]
    model = ToyDetector(config.width)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(i, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="train toy detector", leave=False, disable=None)
    for step in bar:
        idx = torch.randint(0, n_scenes, (batch,), generator=gen).tolist()
        flip = torch.rand(batch, generator=gen) < 0.5
        batch_imgs, batch_pos, batch_tgt = [], [], []
        for i, f in zip(idx, flip.tolist()):
            if f:
                img, b, k = flip_scene(images[i], boxes[i], kps[i])
                p, t = assign_targets(b, k, centers, strides)
            else:
                img, (p, t) = images[i], targets[i]
            batch_imgs.append(img)
            batch_pos.append(p)
            batch_tgt.append(t)
        x = to_detector_input(np.stack(batch_imgs))
        losses = detection_loss(model.forward_raw(x), torch.from_numpy(np.stack(batch_pos)),
                                torch.from_numpy(np.stack(batch_tgt)))
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            msg = " ".join(f"{k} {v.item():.4f}" for k, v in losses.items())
            bar.set_postfix_str(msg)
            logger.info("detector step %d/%d %s (%.1f s)", step, steps, msg, time.perf_counter() - t0)
    model.eval()
    return model


def greedy_match(pred_boxes: np.ndarray, pred_scores: np.ndarray, gt_boxes: np.ndarray,
                 iou_thresh: float = 0.5) -> list[tuple[int, int]]:
    """Match detections to ground truth, best score first, each to its highest-IoU unmatched GT box.

    pred_boxes (P, 4), pred_scores (P,), gt_boxes (G, 4), x1 y1 x2 y2. Returns (pred index, gt index) pairs
    with IoU >= iou_thresh.

    >>> greedy_match(np.array([[0, 0, 10, 10.]]), np.array([0.9]), np.array([[1, 1, 10, 10.]]))
    [(0, 0)]
    """
    if len(pred_boxes) == 0 or len(gt_boxes) == 0:
        return []
    p, g = np.asarray(pred_boxes, np.float64)[:, None], np.asarray(gt_boxes, np.float64)[None]
    iw = np.clip(np.minimum(p[..., 2], g[..., 2]) - np.maximum(p[..., 0], g[..., 0]), 0, None)
    ih = np.clip(np.minimum(p[..., 3], g[..., 3]) - np.maximum(p[..., 1], g[..., 1]), 0, None)
    inter = iw * ih
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    iou = inter / (area(p) + area(g) - inter)
    free = np.ones(iou.shape[1], bool)
    pairs = []
    for i in np.argsort(-np.asarray(pred_scores), kind="stable"):
        cand = np.where(free, iou[i], -1.0)
        j = int(np.argmax(cand))
        if cand[j] >= iou_thresh:
            pairs.append((int(i), j))
            free[j] = False
    return pairs


def detection_metrics(detections: list, scenes: list[Scene], iou_thresh: float = 0.5) -> dict[str, float]:
    """Precision, recall (IoU >= iou_thresh, greedy) and landmark error (px, mean over the 5 points of
    matched faces: 'lmk_mean', 'lmk_median') of per-image Detections against the scenes' ground truth."""
    n_pred = n_gt = 0
    errors = []
    for det, sc in zip(detections, scenes, strict=True):
        pairs = greedy_match(det.boxes, det.scores, sc.boxes, iou_thresh)
        n_pred += len(det)
        n_gt += len(sc.boxes)
        for i, j in pairs:
            errors.append(float(np.linalg.norm(det.landmarks[i] - sc.landmarks[j], axis=-1).mean()))
    tp = len(errors)
    return {
        "precision": tp / n_pred if n_pred else 1.0,
        "recall": tp / n_gt if n_gt else 1.0,
        "lmk_mean": float(np.mean(errors)) if errors else float("nan"),
        "lmk_median": float(np.median(errors)) if errors else float("nan"),
        "n_faces": float(n_gt),
        "n_detections": float(n_pred),
    }


def evaluate_detector(detector: str | Path | FaceDetector, world_seed: int, test_ids: range,
                      n_scenes: int = 200, seed: int = 12345, *, det_thresh: float = 0.5,
                      batch: int = 16) -> dict[str, float]:
    """Run the REAL FaceDetector (ONNX through insightface) on n_scenes fresh scenes of `test_ids`.

    Returns detection_metrics(...): precision, recall (IoU 0.5), lmk_mean / lmk_median (px), n_faces.
    """
    if not isinstance(detector, FaceDetector):
        detector = FaceDetector(detector, det_thresh=det_thresh)
    rng = np.random.default_rng((seed, world_seed))
    cache: dict[int, Identity] = {}
    scenes = [random_scene(world_seed, test_ids, rng, cache) for _ in range(n_scenes)]
    dets = []
    for i in range(0, n_scenes, batch):
        dets += detector.detect([sc.image for sc in scenes[i : i + batch]])
    return detection_metrics(dets, scenes)


def build_detector(out_dir: str | Path, world_seed: int, *, train_ids: range, config: ToyDetectorConfig,
                   metadata: dict[str, str] | None = None) -> Path:
    """Train the toy detector and export it to out_dir / DETECTOR_FILE (ONNX metadata_props = metadata).

    Deterministic: same arguments and numeric environment -> same ONNX bytes (deterministic algorithms
    are switched on for the run and restored after; they cost nothing measurable for these CPU convs).
    """
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        model = train_detector(world_seed, train_ids=train_ids, config=config)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    path = export_detector_onnx(model, Path(out_dir) / DETECTOR_FILE, example_size=SCENE_SIZE, metadata=metadata)
    logger.info("toy detector written to %s", path)
    return path
