"""Identity rewards of ReReFL: SIR and MIMR on similarity matrices, and the batched reward module.

A similarity matrix `sim` is (M, N): M reference identities (rows) x N faces detected in one generated image
(columns), cosine similarities of L2-normalized ArcFace embeddings, so values lie in [-1, 1].

MIMR (multi-identity matching reward, PAPER.md) treats identity consistency as an assignment problem: the
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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from umo.faces.align import similarity_transforms, warp_faces
from umo.faces.types import Detections

log = logging.getLogger(__name__)

ArrayLike = Any  # torch.Tensor | np.ndarray | nested sequences of floats


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
