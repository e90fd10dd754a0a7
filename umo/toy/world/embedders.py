"""Train the toy world's face embedders: the reward's ArcFace backbone and the evaluation judges.

The reward and the judge are IResNets trained from scratch with an ArcFace (additive angular margin) loss on
aligned crops of identities 0..n_train-1, with different seeds and depths, and saved in the real formats:
- the REWARD: an arcface_torch state dict (`arcface_<arch>.safetensors`, e.g. arcface_toy_r18), read by
  `load_arcface`;
- the JUDGE: an insightface-routable recognizer ONNX (`judge_<arch>.onnx`, e.g. judge_toy_r10), read by
  `OnnxRecognizer`.
An optional SECOND JUDGE (`build_second_judge`) is another architecture, by default a MobileFaceNet
(`umo.toy.world.mobileface`, judge_toy_mbf.onnx), trained the same way on people nobody else learns.
Crops are made exactly as the pipeline makes them: a rendered scene, its 5 true landmarks, the arcface
template fit (`similarity_transforms`) and cv2.warpAffine to 112x112.

Held-out identities (never trained on) measure verification: TAR at a fixed FAR over all genuine and
impostor pairs of their embeddings (`verification_metrics`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from umo.faces.align import similarity_transforms
from umo.faces.embed import IResNet, OnnxRecognizer, iresnet, load_arcface
from umo.images import rgb_to_signed
from umo.io import save_safetensors
from umo.toy.config import ToyEmbedderConfig
from umo.toy.onnx_export import export_recognizer_onnx
from umo.toy.world.identity import make_identity
from umo.toy.world.mobileface import ARCHS as MOBILEFACE_ARCHS
from umo.toy.world.mobileface import mobilefacenet
from umo.toy.world.render import render_scene

log = logging.getLogger(__name__)

CROP = 112
# Render streams of `aligned_faces` (its `seed`): every model's held-out crops are the same faces, so their
# verification numbers and score correlations compare like with like.
TRAIN_RENDERS, HELD_OUT_RENDERS, SECOND_JUDGE_RENDERS = 0, 1, 2


# ---------------------------------------------------------------------------------------------------------
# Data: aligned crops of rendered scenes
# ---------------------------------------------------------------------------------------------------------


def aligned_faces(
    world_seed: int, ids: Sequence[int], per_id: int, seed: int, *, canvas: int = 192
) -> tuple[np.ndarray, np.ndarray]:
    """Render `per_id` single-person scenes of each identity and align each face with its true landmarks.

    Each scene has its own background, pose, lighting, size and camera effects (render_scene); the crop is
    the arcface-template warp of the 5 true landmarks, so it includes hair, neck and background as the
    reward's crops do. canvas: scene side in px (faces are 0.22-0.43 of it wide).
    Returns (crops (N, 112, 112, 3) uint8 RGB, labels (N,) int64 identity ids), N = len(ids) * per_id,
    ordered by id then sample. Deterministic in (world_seed, ids, per_id, seed).
    """
    rng = np.random.default_rng([seed, world_seed])
    crops = np.empty((len(ids) * per_id, CROP, CROP, 3), np.uint8)
    labels = np.repeat(np.asarray(ids, np.int64), per_id)
    t0 = time.perf_counter()
    for i, identity_id in enumerate(ids):
        identity = make_identity(world_seed, int(identity_id))
        for j in range(per_id):
            scene = render_scene(world_seed, [identity], rng, (canvas, canvas))
            mats, valid = similarity_transforms(scene.landmarks, image_size=CROP)
            if not valid[0]:
                raise RuntimeError(f"identity {identity_id}: degenerate true landmarks {scene.landmarks[0]}")
            crops[i * per_id + j] = cv2.warpAffine(scene.image, mats[0], (CROP, CROP), flags=cv2.INTER_LINEAR,
                                                   borderValue=0.0)
    dt = time.perf_counter() - t0
    log.info("rendered and aligned %d faces in %.1f s (%.1f ms per face)", len(crops), dt,
             1000 * dt / max(len(crops), 1))
    return crops, labels


def to_input(crops: np.ndarray) -> torch.Tensor:
    """(N, 112, 112, 3) uint8 RGB -> (N, 3, 112, 112) float32 in [-1, 1], arcface_torch's normalization."""
    return rgb_to_signed(crops)


# ---------------------------------------------------------------------------------------------------------
# The ArcFace head and the training loop
# ---------------------------------------------------------------------------------------------------------


class ArcFaceHead(nn.Module):
    """ArcFace logits: s * cos(theta_y + m) for the true class, s * cos(theta_j) for the others.

    Class centres are L2-normalized weights (num_classes, D). As arcface_torch's ArcFace: when theta_y + m
    would pass pi the target logit is not monotonic in theta, so beyond cos(theta) <= cos(pi - m) it
    falls back to cos(theta) - m * sin(m) (or, with easy_margin, no margin at all for cos(theta) <= 0).
    """

    def __init__(self, num_features: int, num_classes: int, *, s: float = 32.0, m: float = 0.5,
                 easy_margin: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, num_features).normal_(0, 0.01))
        self.s, self.m, self.easy_margin = s, m, easy_margin
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        self.th, self.mm = math.cos(math.pi - m), math.sin(math.pi - m) * m

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """emb: (B, D) unnormalized; labels: (B,) in [0, num_classes). Returns (B, num_classes) logits."""
        cos = F.linear(F.normalize(emb, dim=1), F.normalize(self.weight, dim=1)).clamp(-1.0, 1.0)
        target = cos.gather(1, labels[:, None])
        sin = (1.0 - target * target).clamp_min(1e-7).sqrt()
        with_margin = target * self.cos_m - sin * self.sin_m
        if self.easy_margin:
            with_margin = torch.where(target > 0, with_margin, target)
        else:
            with_margin = torch.where(target > self.th, with_margin, target - self.mm)
        return self.s * cos.scatter(1, labels[:, None], with_margin)


def backbone(arch: str, num_features: int) -> nn.Module:
    """A fresh embedder of `arch` (random init, train mode): toy_mbf is a MobileFaceNet, the rest IResNets."""
    if arch in MOBILEFACE_ARCHS:
        return mobilefacenet(arch, num_features=num_features)
    return iresnet(arch, num_features=num_features)


def train_embedder(crops: np.ndarray, labels: np.ndarray, cfg: ToyEmbedderConfig, *,
                   max_steps: int | None = None) -> tuple[nn.Module, list[float]]:
    """Train `cfg.arch` (`backbone`) with an ArcFace head on aligned crops; returns (backbone in eval mode,
    step losses).

    crops: (N, 112, 112, 3) uint8 RGB; labels: (N,) any integer ids (remapped to 0..C-1).
    Augmentation: random horizontal flip (identity-preserving; the crop template is left-right symmetric).
    Deterministic on one machine given cfg.seed (call torch.set_num_threads(1) for bitwise repeatability).
    max_steps: stop early (tests); the schedule still spans cfg.epochs.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    classes, y_all = np.unique(labels, return_inverse=True)
    x_all = to_input(crops).contiguous(memory_format=torch.channels_last)
    y_all = torch.from_numpy(y_all.astype(np.int64))
    model = backbone(cfg.arch, cfg.num_features).to(memory_format=torch.channels_last)
    head = ArcFaceHead(cfg.num_features, len(classes), s=cfg.s, m=cfg.m, easy_margin=cfg.easy_margin)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(x_all) // cfg.batch)
    total = max(1, steps_per_epoch * cfg.epochs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.1)
    losses: list[float] = []
    model.train()
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(x_all), generator=gen)
        for k in range(steps_per_epoch):
            idx = order[k * cfg.batch : (k + 1) * cfg.batch]
            x, y = x_all[idx], y_all[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            loss = F.cross_entropy(head(model(x), y), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if max_steps is not None and len(losses) >= max_steps:
                model.eval()
                return model, losses
        log.info("%s epoch %d/%d: loss %.3f (%.0f s)", cfg.arch, epoch + 1, cfg.epochs,
                 float(np.mean(losses[-steps_per_epoch:])), time.perf_counter() - t0)
    model.eval()
    return model, losses


@torch.no_grad()
def embed(model: nn.Module, crops: np.ndarray, batch: int = 256) -> np.ndarray:
    """(N, 112, 112, 3) uint8 RGB -> (N, D) float32 L2-normalized embeddings (model in eval mode)."""
    model.eval()
    out = [F.normalize(model(to_input(crops[i : i + batch])), dim=1) for i in range(0, len(crops), batch)]
    return torch.cat(out).numpy().astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Verification metrics
# ---------------------------------------------------------------------------------------------------------


def _pair_scores(emb: np.ndarray) -> np.ndarray:
    """Cosine of every unordered pair i < j, in np.triu_indices order."""
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    i, j = np.triu_indices(len(emb), k=1)
    return np.einsum("kd,kd->k", emb[i], emb[j])


def tar_at_far(genuine: np.ndarray, impostor: np.ndarray, far: float) -> float:
    """Fraction of genuine scores strictly above the threshold t that n = floor(far * n_impostor) impostors
    exceed (t = the (n + 1)-th highest impostor score); nan when n < 1 (too few impostors for that FAR)."""
    n_acc = int(math.floor(far * len(impostor)))
    if n_acc < 1 or len(genuine) == 0:
        return float("nan")
    threshold = np.sort(impostor)[::-1][n_acc]  # exactly n_acc impostors lie above it (ties aside)
    return float(np.mean(genuine > threshold))


def equal_error_rate(genuine: np.ndarray, impostor: np.ndarray) -> float:
    """The rate at the threshold where false accepts (impostor > t) and false rejects (genuine <= t) meet."""
    thresholds = np.unique(np.concatenate([genuine, impostor]))
    gen, imp = np.sort(genuine), np.sort(impostor)
    frr = np.searchsorted(gen, thresholds, side="right") / len(gen)
    far = 1.0 - np.searchsorted(imp, thresholds, side="right") / len(imp)
    k = int(np.argmin(np.abs(far - frr)))
    return float((far[k] + frr[k]) / 2)


def verification_metrics(emb_a: np.ndarray, labels: np.ndarray, emb_b: np.ndarray | None = None) -> dict:
    """Verification over all pairs of (N, D) embeddings: genuine = same label, impostor = different.

    Returns {"n_genuine", "n_impostor", "tar@far1e-3", "tar@far1e-4" (nan when too few impostors),
    "eer"}; with `emb_b` (the same N faces by another embedder) also the same metrics of b with a "b_"
    prefix, "score_corr": the Pearson correlation of a's and b's scores over all pairs, and
    "impostor_score_corr": the same over impostor pairs only (how much two models agree on who looks alike:
    the lower, the less an image tuned to fool one fools the other).
    """
    labels = np.asarray(labels)
    i, j = np.triu_indices(len(labels), k=1)
    same = labels[i] == labels[j]
    out: dict = {"n_genuine": int(same.sum()), "n_impostor": int((~same).sum())}
    scores = {"": _pair_scores(np.asarray(emb_a, np.float64))}
    if emb_b is not None:
        scores["b_"] = _pair_scores(np.asarray(emb_b, np.float64))
    for prefix, sc in scores.items():
        g, imp = sc[same], sc[~same]
        out[prefix + "tar@far1e-3"] = tar_at_far(g, imp, 1e-3)
        out[prefix + "tar@far1e-4"] = tar_at_far(g, imp, 1e-4)
        out[prefix + "eer"] = equal_error_rate(g, imp)
    if emb_b is not None:
        out["score_corr"] = float(np.corrcoef(scores[""], scores["b_"])[0, 1])
        out["impostor_score_corr"] = float(np.corrcoef(scores[""][~same], scores["b_"][~same])[0, 1])
    return out


# ---------------------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------------------


def save_reward(model: IResNet, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the backbone's state dict (tensors only, arcface_torch names) as safetensors, atomically, with
    `metadata` as the header's one "umo" entry (`umo.io.save_safetensors`)."""
    return save_safetensors(model.state_dict(), path, metadata)


def reward_file(cfg: ToyEmbedderConfig) -> str:
    """File name of the reward embedder: arcface_<arch>.safetensors (toy archs start with toy_)."""
    return f"arcface_{cfg.arch}.safetensors"


def judge_file(cfg: ToyEmbedderConfig) -> str:
    """File name of the judge: judge_<arch>.onnx."""
    return f"judge_{cfg.arch}.onnx"


def build_embedders(
    world_seed: int,
    *,
    reward: ToyEmbedderConfig,
    reward_path: Path,
    judge: ToyEmbedderConfig,
    judge_path: Path,
    train_ids: range,
    test_ids: range,
    per_id: int,
    per_test_id: int,
    metadata: dict[str, str] | None = None,
) -> dict:
    """Train the reward and the judge on crops of `train_ids`, save them, and measure both on `test_ids`.

    Each embedder learns the ids of `train_ids` inside its own `identities` range (all of them when null):
    the defaults give the reward and the judge disjoint halves. The reward is written to reward_path
    (arcface_torch safetensors), the judge to judge_path (ONNX recognizer). Verification runs on the files as
    written, through the real loaders (`load_arcface` + `ArcFaceEmbedder`, `OnnxRecognizer`). Returns
    verification_metrics(reward, judge) plus train times.
    """
    train_x, train_y = aligned_faces(world_seed, train_ids, per_id, seed=TRAIN_RENDERS)
    test_x, test_y = aligned_faces(world_seed, test_ids, per_test_id, seed=HELD_OUT_RENDERS)

    def own(cfg: ToyEmbedderConfig) -> tuple[np.ndarray, np.ndarray]:
        if cfg.identities is None:
            return train_x, train_y
        keep = (train_y >= cfg.identities[0]) & (train_y < cfg.identities[1])
        return train_x[keep], train_y[keep]

    times: dict = {}
    t0 = time.perf_counter()
    model, _ = train_embedder(*own(reward), reward)
    save_reward(model, Path(reward_path), metadata)
    times["reward_train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, _ = train_embedder(*own(judge), judge)
    export_recognizer_onnx(model, judge_path, metadata=metadata)
    times["judge_train_s"] = time.perf_counter() - t0
    del model, train_x

    emb_reward = embed(load_arcface(reward_path, reward.arch, num_features=reward.num_features), test_x)
    emb_judge = OnnxRecognizer(judge_path).embed_aligned(test_x)
    result = verification_metrics(emb_reward, test_y, emb_judge) | times
    log.info("toy embedders: %s", result)
    return result


def build_second_judge(
    world_seed: int,
    *,
    judge: ToyEmbedderConfig,
    judge_path: Path,
    test_ids: range,
    per_id: int,
    per_test_id: int,
    metadata: dict[str, str] | None = None,
) -> dict:
    """Train a second judge on its own people, save it as an ONNX recognizer and measure it on `test_ids`.

    Its people are `judge.identities` (required; e.g. ids past the identity pool, whom no other model learns),
    `per_id` crops each from their own render stream. It is written to judge_path and measured through
    `OnnxRecognizer` on the very held-out crops `build_embedders` measures the first judge on (the same
    world_seed, test_ids and per_test_id give the same faces). Returns verification_metrics(second judge)
    plus "train_s" (rendering included).
    """
    if judge.identities is None:
        raise ValueError("the second judge needs its own identities [first, last)")
    t0 = time.perf_counter()
    train_x, train_y = aligned_faces(world_seed, range(*judge.identities), per_id, seed=SECOND_JUDGE_RENDERS)
    model, _ = train_embedder(train_x, train_y, judge)
    export_recognizer_onnx(model, judge_path, metadata=metadata)
    train_s = time.perf_counter() - t0
    del model, train_x

    test_x, test_y = aligned_faces(world_seed, test_ids, per_test_id, seed=HELD_OUT_RENDERS)
    result = verification_metrics(OnnxRecognizer(judge_path).embed_aligned(test_x), test_y) | {"train_s": train_s}
    log.info("toy second judge: %s", result)
    return result


def judges_agreement(world_seed: int, judge_paths: Sequence[Path], test_ids: range, per_test_id: int) -> dict:
    """How alike two ONNX judges score the held-out pairs (the crops both builds measure on).

    Returns {"score_corr": Pearson correlation of their cosines over all pairs, "impostor_score_corr": the same
    over impostor pairs only}: the lower, the less an image made to please one judge pleases the other for free.
    """
    test_x, test_y = aligned_faces(world_seed, test_ids, per_test_id, seed=HELD_OUT_RENDERS)
    first, second = (OnnxRecognizer(path).embed_aligned(test_x) for path in judge_paths)
    result = verification_metrics(first, test_y, second)
    return {k: result[k] for k in ("score_corr", "impostor_score_corr")}
