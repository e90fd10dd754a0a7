"""Identity rewards of ReReFL: SIR and MIMR on similarity matrices, and the batched reward module.

A similarity matrix `sim` is (M, N): M reference identities (rows) x N faces detected in one generated image
(columns), cosine similarities of L2-normalized ArcFace embeddings, so values lie in [-1, 1].

MIMR (multi-identity matching reward, docs/method.md) treats identity consistency as an assignment problem: the
Hungarian assignment pairs min(M, N) references with faces so that the total similarity is largest; assigned
pairs are weighted +1, every other pair -1, and the reward is the mean of the weighted matrix. A face that
resembles two references is thus paid once and penalized once, which is what removes identity confusion.

    >>> import numpy as np
    >>> sim = np.array([[0.9, 0.2], [0.3, 0.8]])
    >>> round(matching_reward(sim), 4)          # (0.9 + 0.8 - 0.2 - 0.3) / 4
    0.3
    >>> round(single_identity_reward(sim), 4)   # (0.9 + 0.8) / 2
    0.85
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from umo.faces.align import similarity_transforms, warp_faces
from umo.faces.detect import FaceDetector
from umo.faces.embed import load_arcface
from umo.faces.types import Detections

log = logging.getLogger(__name__)

ArrayLike = Any  # torch.Tensor | np.ndarray | nested sequences of floats

# A face whose landmarks fall partly outside the image is kept by the reward and by the judge alike, and
# cropped with a black border: -1 in the reward's [-1, 1] images, 0 in the judge's uint8 ones (cv2's and
# insightface norm_crop's borderValue=0, the border the toy embedders were trained with). Dropping it would
# let the policy hide a duplicated face at the edge, where the judge still counts and scores it.
CROP_FILL = -1.0


def check_similarity(sim: ArrayLike, name: str = "sim") -> ArrayLike:
    """Validate a similarity matrix: 2-D, finite. Returns torch tensors as they are, anything else as float64."""
    if isinstance(sim, torch.Tensor):
        if sim.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D (M references x N faces) matrix, got shape {tuple(sim.shape)}")
        if not sim.is_floating_point():
            sim = sim.double()
        if sim.numel() and not bool(torch.isfinite(sim).all()):
            raise ValueError(f"{name}: contains NaN or inf similarities")
        return sim
    arr = np.asarray(sim, dtype=np.float64)
    if arr.ndim != 2:
        # np.asarray([]) is 1-D with 0 elements: treat that as a 0 x 0 matrix.
        if arr.size == 0:
            return arr.reshape(0, 0)
        raise ValueError(f"{name}: expected a 2-D (M references x N faces) matrix, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains NaN or inf similarities")
    return arr


def hungarian(sim: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the assignment maximizing total similarity; min(M, N) pairs, rectangular allowed.

    Ties are broken deterministically (scipy's order). Every optimal assignment gives the same MIMR, since
    R = (2 * assigned_sum - total_sum) / (M * N) depends on the assignment only through its total.
    """
    sim = check_similarity(sim)
    values = sim.detach().cpu().double().numpy() if isinstance(sim, torch.Tensor) else sim
    if values.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows, cols = linear_sum_assignment(values, maximize=True)
    return rows.astype(np.int64), cols.astype(np.int64)


def matching_weights(
    sim: ArrayLike, *, matched_weight: float = 1.0, unmatched_weight: float = -1.0
) -> np.ndarray:
    """W (M, N): `matched_weight` on Hungarian-assigned pairs, `unmatched_weight` on all other pairs."""
    sim = check_similarity(sim)
    weights = np.full(tuple(sim.shape), unmatched_weight, dtype=np.float64)
    rows, cols = hungarian(sim)
    weights[rows, cols] = matched_weight
    return weights


def matching_reward(
    sim: ArrayLike, *, matched_weight: float = 1.0, unmatched_weight: float = -1.0
) -> torch.Tensor | float:
    """MIMR of one image: mean over all M*N entries of W * sim (see `matching_weights`).

    sim: (M, N) cosine similarities, M references x N generated faces; torch tensor or array-like.
    Returns a 0-d tensor (differentiable w.r.t. `sim`; the assignment itself carries no gradient) for a
    tensor input, a float otherwise. 0 when M or N is 0.
    """
    sim = check_similarity(sim)
    if isinstance(sim, torch.Tensor):
        if sim.numel() == 0:
            return sim.new_zeros(())
        weights = torch.as_tensor(
            matching_weights(sim, matched_weight=matched_weight, unmatched_weight=unmatched_weight),
            dtype=sim.dtype,
            device=sim.device,
        )
        return (weights * sim).mean()
    if sim.size == 0:
        return 0.0
    return float((matching_weights(sim, matched_weight=matched_weight, unmatched_weight=unmatched_weight) * sim).mean())


def single_identity_reward(sim: ArrayLike) -> torch.Tensor | float:
    """SIR: mean over references of each reference's best similarity to any generated face.

    The per-identity baseline of the ablation: nothing stops two references from claiming the same face.
    sim: (M, N). Returns a 0-d tensor for a tensor input (differentiable), a float otherwise; 0 when empty.
    """
    sim = check_similarity(sim)
    if isinstance(sim, torch.Tensor):
        if sim.numel() == 0:
            return sim.new_zeros(())
        return sim.max(dim=1).values.mean()
    if sim.size == 0:
        return 0.0
    return float(sim.max(axis=1).mean())


# ----------------------------------------------------------------------------------------- the batched module


@dataclass
class RewardOutput:
    """What `MatchingReward` returns for a batch of B generated images.

    rewards:      (B,) differentiable w.r.t. the images; 0 (constant) for a sample with no usable face.
    matched:      (B,) detached: the part of the reward from assigned pairs (MIMR; SIR puts all of it here).
    unmatched:    (B,) detached: the part from all other pairs (MIMR; 0 for SIR). matched + unmatched = rewards.
    faces:        (B,) long: generated faces scored per image.
    similarities: B detached (M_i, N_i) matrices, references x scored faces.
    skipped:      faces dropped in this batch, by reason: "degenerate" (landmarks unusable for alignment),
                  "small" (below min_face_size), "over_max" (beyond max_faces per image).
    boxes:        B (N_i, 4) float arrays: the scored faces' boxes (x0, y0, x1, y1, pixels), in the order of the
                  similarity matrices' columns (what the pictures of the matching draw).
    """

    rewards: torch.Tensor
    matched: torch.Tensor
    unmatched: torch.Tensor
    faces: torch.Tensor
    similarities: list[torch.Tensor]
    skipped: dict[str, int]
    boxes: list[np.ndarray] = field(default_factory=list)


def check_images(images: torch.Tensor, name: str = "images") -> None:
    """Validate generated images: a (B, 3, H, W) float tensor, finite, in [-1, 1]."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name}: expected a torch tensor (B, 3, H, W), got {type(images).__name__}")
    if not images.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor in [-1, 1], got dtype {images.dtype}")
    if images.ndim != 4:
        raise ValueError(f"{name}: expected shape (B, 3, H, W), got {tuple(images.shape)}")
    if images.shape[1] != 3:
        raise ValueError(f"{name}: expected 3 (RGB) channels in dim 1, got {images.shape[1]} ({tuple(images.shape)})")
    if images.shape[0] == 0 or images.shape[2] < 8 or images.shape[3] < 8:
        raise ValueError(f"{name}: empty batch or images smaller than 8x8: {tuple(images.shape)}")
    with torch.no_grad():
        if not bool(torch.isfinite(images).all()):
            raise ValueError(f"{name}: contains NaN or inf pixels")
        lo, hi = float(images.min()), float(images.max())
    # A small tolerance for float rounding; anything more means the caller forgot to clamp or rescale.
    if lo < -1.001 or hi > 1.001:
        raise ValueError(
            f"{name}: expected values in [-1, 1], got [{lo:.3f}, {hi:.3f}] (clamp decoded images, "
            "and map [0, 1] or [0, 255] images to [-1, 1])"
        )


class MatchingReward(nn.Module):
    """Batched identity reward: generated images (B, 3, H, W) in [-1, 1] + cached reference embeddings -> (B,).

    Per batch: ONE batched detector call on the (detached) images, one similarity fit for all faces, ONE
    differentiable warp of all faces, ONE embedder forward for all faces, then a Hungarian assignment per
    sample on its small (M_i, N_i) matrix. Reference embeddings are inputs, computed once at data prep (or
    once per sample with `embed_references`), never per call. Gradients flow to the images through the warp
    and the embedder only; detection, landmarks and the assignment carry none (docs/method.md).
    """

    def __init__(
        self,
        detector: Any,
        embedder: nn.Module,
        *,
        kind: str = "mimr",
        matched_weight: float = 1.0,
        unmatched_weight: float = -1.0,
        max_faces: int = 8,
        min_face_size: float = 0.0,
    ) -> None:
        super().__init__()
        if kind not in ("mimr", "sir"):
            raise ValueError(f"kind: expected 'mimr' or 'sir', got {kind!r}")
        self.detector = detector  # FaceDetector: ONNX runtime, not a torch module
        self.embedder = embedder
        self.kind = kind
        self.matched_weight = float(matched_weight)
        self.unmatched_weight = float(unmatched_weight)
        self.max_faces = int(max_faces)
        self.min_face_size = float(min_face_size)

    @classmethod
    def from_config(cls, faces: Any, reward: Any) -> "MatchingReward":
        """Build from `FacesConfig` and `RewardConfig` (umo.config): loads the detector pack and embedder."""
        detector = FaceDetector.from_config(faces.detector, providers=faces.providers)
        embedder = load_arcface(faces.embedder.path, faces.embedder.arch)
        return cls(
            detector, embedder, kind=reward.kind, matched_weight=reward.matched_weight,
            unmatched_weight=reward.unmatched_weight, max_faces=reward.max_faces, min_face_size=faces.min_face_size,
        )

    # The four steps are public so that benchmarks can time each one alone.

    def detect(self, images: torch.Tensor) -> tuple[list[Detections], dict[str, int]]:
        """Faces per image (no gradient), filtered by size and capped at max_faces (best scores kept)."""
        detections = self.detector.detect_tensor(images.detach())
        skipped = {"small": 0, "over_max": 0}
        kept = []
        for det in detections:
            keep = np.arange(len(det))
            if self.min_face_size > 0 and len(det):
                sides = np.minimum(det.boxes[:, 2] - det.boxes[:, 0], det.boxes[:, 3] - det.boxes[:, 1])
                keep = keep[sides >= self.min_face_size]
                skipped["small"] += len(det) - len(keep)
            if len(keep) > self.max_faces:  # detections come best score first
                skipped["over_max"] += len(keep) - self.max_faces
                keep = keep[: self.max_faces]
            kept.append(Detections(det.boxes[keep], det.landmarks[keep], det.scores[keep]))
        return kept, skipped

    def align(self, images: torch.Tensor, detections: Sequence[Detections]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """All usable faces of the batch as (K, 3, 112, 112) crops (differentiable), their owner image (K,), and
        the number of faces skipped for degenerate landmarks (collinear, coincident, non-finite). A face partly
        outside the image is usable: its crop has a black border (`CROP_FILL`), as the judge's has."""
        faces, owner, valid = self._align(images, detections)
        return faces, owner, int((~valid).sum())

    def _align(self, images: torch.Tensor, detections: Sequence[Detections]
               ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """`align`, returning which of the batch's detections (concatenated in order) were usable."""
        counts = [len(d) for d in detections]
        owner = np.repeat(np.arange(len(detections)), counts)
        landmarks = (
            np.concatenate([d.landmarks for d in detections]) if sum(counts) else np.zeros((0, 5, 2), np.float32)
        )
        matrices, valid = similarity_transforms(landmarks)
        skipped = int((~valid).sum())
        if skipped:
            log.debug("skipping %d face(s) with degenerate landmarks", skipped)
        owner_t = torch.as_tensor(owner[valid], dtype=torch.long, device=images.device)
        return warp_faces(images, owner_t, matrices[valid], fill=CROP_FILL), owner_t, valid

    def embed(self, faces: torch.Tensor) -> torch.Tensor:
        """(K, 3, 112, 112) in [-1, 1] -> (K, D) L2-normalized float32 embeddings, one forward."""
        return self.embedder(faces).float()

    def score(
        self, embeddings: torch.Tensor, owner: torch.Tensor, references: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Per sample: sim = refs (M_i, D) @ faces (N_i, D)^T, then MIMR or SIR. Returns rewards, matched and
        unmatched parts, face counts and the detached similarity matrices."""
        batch = len(references)
        device = embeddings.device
        rewards, matched, unmatched, sims = [], [], [], []
        counts = torch.bincount(owner, minlength=batch)  # an empty owner gives zeros
        for i, refs in enumerate(references):
            faces = embeddings[owner == i]
            if refs.shape[0] == 0 or faces.shape[0] == 0:  # no reference or no face: 0 and no gradient
                zero = embeddings.new_zeros(())
                sims.append(embeddings.new_zeros((refs.shape[0], faces.shape[0])))
                rewards.append(zero), matched.append(zero), unmatched.append(zero)
                continue
            if refs.shape[1] != faces.shape[1]:
                raise ValueError(
                    f"references[{i}]: embeddings of size {refs.shape[1]}, but the embedder gives {faces.shape[1]}"
                )
            sim = refs @ faces.T  # (M_i, N_i)
            sims.append(sim.detach())
            if self.kind == "sir":
                r = single_identity_reward(sim)
                rewards.append(r), matched.append(r.detach()), unmatched.append(r.detach() * 0)
                continue
            w = torch.as_tensor(
                matching_weights(sim, matched_weight=self.matched_weight, unmatched_weight=self.unmatched_weight),
                dtype=sim.dtype, device=device,
            )
            weighted = w * sim / sim.numel()
            rewards.append(weighted.sum())
            is_matched = w == self.matched_weight
            matched.append(weighted.detach()[is_matched].sum())
            unmatched.append(weighted.detach()[~is_matched].sum())
        return (
            torch.stack(rewards), torch.stack(matched), torch.stack(unmatched), counts.to(device), sims,
        )

    def forward(self, images: torch.Tensor, references: Sequence[torch.Tensor]) -> torch.Tensor:
        """Rewards (B,), differentiable w.r.t. `images`; see `compute` for the arguments and the details."""
        return self.compute(images, references).rewards

    def compute(self, images: torch.Tensor, references: Sequence[torch.Tensor]) -> RewardOutput:
        """images: (B, 3, H, W) float in [-1, 1]; references: B tensors (M_i, D), L2-normalized embeddings of
        sample i's reference identities (M_i may be 0). Returns `RewardOutput`: rewards (B,), their matched
        and unmatched parts, faces per image, similarity matrices and skipped-face counts."""
        check_images(images)
        refs = self._check_references(references, images.shape[0], images.device)
        detections, skipped = self.detect(images)
        faces, owner, valid = self._align(images, detections)
        skipped["degenerate"] = int((~valid).sum())
        embeddings = self.embed(faces) if faces.shape[0] else faces.new_zeros((0, 0))
        rewards, matched, unmatched, counts, sims = self.score(embeddings, owner, refs)
        boxes = (np.concatenate([d.boxes for d in detections]) if len(valid) else np.zeros((0, 4)))[valid]
        kept = owner.cpu().numpy()
        return RewardOutput(rewards, matched, unmatched, counts, sims, skipped,
                            [boxes[kept == i].astype(np.float64) for i in range(images.shape[0])])

    @torch.no_grad()
    def embed_references(self, images: torch.Tensor, *, largest_only: bool = False) -> list[torch.Tensor]:
        """The public code's mode: reference identities = the faces detected in each TARGET image.

        images (B, 3, H, W) in [-1, 1] -> B detached (M_i, D) embeddings. Call once per sample and cache the
        result; `largest_only` keeps one face per image (a single-identity reference photo).
        """
        check_images(images, "target images")
        detections, _ = self.detect(images)
        if largest_only:
            detections = [d.largest() for d in detections]
        faces, owner, _ = self.align(images, detections)
        embeddings = self.embed(faces) if faces.shape[0] else faces.new_zeros((0, 0))
        return [embeddings[owner == i] for i in range(images.shape[0])]

    def _check_references(
        self, references: Sequence[torch.Tensor], batch: int, device: torch.device
    ) -> list[torch.Tensor]:
        if len(references) != batch:
            raise ValueError(f"references: expected one (M_i, D) tensor per image ({batch}), got {len(references)}")
        refs = []
        dims = {r.shape[1] for r in references if isinstance(r, torch.Tensor) and r.ndim == 2 and r.shape[0]}
        if len(dims) > 1:
            raise ValueError(f"references: embedding sizes differ across samples: {sorted(dims)}")
        for i, r in enumerate(references):
            if not isinstance(r, torch.Tensor) or r.ndim != 2:
                raise ValueError(f"references[{i}]: expected a (M, D) tensor, got {getattr(r, 'shape', type(r))}")
            if not bool(torch.isfinite(r).all()):
                raise ValueError(f"references[{i}]: contains NaN or inf")
            # Cached embeddings are already unit-norm; renormalizing is cheap insurance against a raw cache.
            refs.append(torch.nn.functional.normalize(r.detach().float().to(device), dim=1))
        return refs
