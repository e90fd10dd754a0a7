"""The synthetic part: multi-person targets generated from single-identity references, kept only when they
show exactly those people.

For each attempt, 2..N train identities (no two of them linked as one person) each give one reference crop;
the generator renders "a photo of person 1 and person 2 ..." conditioned on those references; the reward
embedder's faces of the result are matched to the references by a Hungarian assignment (the same matching as
MIMR). The image is kept only when it has exactly one face per reference and every reference's assigned face
has cosine similarity >= tau. Rejections are counted by reason: `no_face`, `missing_faces` (fewer faces than
references), `extra_faces` (a stranger the reward would never score), `below_threshold`.

A tiny, untrained generator draws no faces and keeps nothing, which is the honest result; a real generator
keeps its consistent images. Generation needs no gradient and runs on the generator's device.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from umo.models import generate_images
from umo.reward import hungarian


def check_generated(references: np.ndarray, faces: np.ndarray, tau: float) -> tuple[bool, str, list[float]]:
    """(M, D) reference and (K, D) generated-face embeddings (L2-normalized) -> (keep, reason, assigned
    similarities in reference order).

    >>> refs = np.eye(3)[:2]
    >>> check_generated(refs, np.array([[0.0, 0.8, 0.6], [0.9, 0.0, np.sqrt(0.19)]]), 0.5)[:2]
    (True, 'kept')
    >>> check_generated(refs, np.array([[0.0, 0.4, np.sqrt(0.84)], [1.0, 0.0, 0.0]]), 0.5)[:2]
    (False, 'below_threshold')
    """
    m, k = len(references), len(faces)
    if k == 0:
        return False, "no_face", []
    if k < m:
        return False, "missing_faces", []
    if k > m:
        return False, "extra_faces", []
    sim = np.asarray(references, np.float64) @ np.asarray(faces, np.float64).T
    rows, cols = hungarian(sim)
    assigned = [0.0] * m
    for r, c in zip(rows.tolist(), cols.tolist()):
        assigned[r] = float(sim[r, c])
    if min(assigned) < tau:
        return False, "below_threshold", assigned
    return True, "kept", assigned


@dataclass(frozen=True)
class Pick:
    """One attempt: which identities (indices into the candidate list) appear, in reference order."""

    attempt: int
    identities: tuple[int, ...]


def pick_identities(means: np.ndarray, count: int, sizes: Sequence[int], *, link_threshold: float,
                    seed: int) -> list[Pick]:
    """`count` seeded draws of n in [sizes[0], sizes[1]] distinct candidates, none two of them linked (their
    faces' mean similarity, the rows of `means` dotted, >= link_threshold). Draws that cannot find enough
    unlinked people are skipped.

    >>> means = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    >>> all(set(p.identities) != {0, 1} for p in pick_identities(means, 20, (2, 2), link_threshold=0.5, seed=0))
    True
    """
    rng = np.random.default_rng(seed)
    picks = []
    for attempt in range(count):
        n = int(rng.integers(sizes[0], sizes[1] + 1))
        chosen: list[int] = []
        for c in rng.permutation(len(means)).tolist():
            if all(float(means[c] @ means[o]) < link_threshold for o in chosen):
                chosen.append(c)
                if len(chosen) == n:
                    break
        if len(chosen) == n:
            picks.append(Pick(attempt, tuple(chosen)))
    return picks


@torch.no_grad()
def generate(generator, prompt: str, references: Sequence[torch.Tensor], *, size: Sequence[int], steps: int,
             seed: int) -> np.ndarray:
    """One (H, W) = size image from the generator (plain Euler sampling): (H, W, 3) uint8 RGB."""
    return generate_images(generator, prompt, references, seeds=[seed], steps=steps, height=int(size[0]),
                           width=int(size[1]))[0]


def synthesize(picks: Sequence[Pick], *, render: Callable[[Pick], np.ndarray],
               embed: Callable[[np.ndarray], np.ndarray], references: Callable[[Pick], np.ndarray], tau: float,
               stats: Counter, progress: bool = True) -> list[tuple[Pick, np.ndarray, list[float]]]:
    """Render each pick, embed its faces, keep it per `check_generated`; returns (pick, image, assigned
    similarities) of the kept ones and counts `attempted`, `kept` and each rejection reason in `stats`."""
    kept = []
    for pick in tqdm(picks, desc="synthetic part", unit="img", disable=None if progress else True):
        image = render(pick)
        ok, reason, sims = check_generated(references(pick), embed(image), tau)
        stats["attempted"] += 1
        stats[reason] += 1
        if ok:
            kept.append((pick, image, sims))
    return kept
