"""Identity metrics of one generated image, exactly as docs/method.md defines them (unscaled; benchmarks apply
x100 for XVerseBench and x10 for OmniContext when they report).

sim is (M, N): M references x N faces detected in the output, cosine similarities from the JUDGE, a face
model independent of the reward's. For reference r, s1 >= s2 are its two highest similarities.

    >>> sim = [[0.8, 0.2], [0.6, 0.5]]
    >>> id_sim(sim)
    [0.8, 0.6]
    >>> [round(v, 4) for v in id_conf(sim)]   # (0.8-0.2)/0.8, (0.6-0.5)/0.6
    [0.75, 0.1667]
    >>> round(id_match(sim), 4)               # assignment (0,0), (1,1)
    0.65
"""

from __future__ import annotations

import numpy as np

from umo.reward import ArrayLike, check_similarity, hungarian


def _values(sim: ArrayLike) -> np.ndarray:
    sim = check_similarity(sim)
    if isinstance(sim, np.ndarray):
        return sim
    return sim.detach().cpu().double().numpy()


def id_sim(sim: ArrayLike) -> list[float]:
    """ID-Sim per reference: its best similarity s1 to any detected face; 0.0 when no face was detected."""
    values = _values(sim)
    m, n = values.shape
    if n == 0:
        return [0.0] * m
    return [float(v) for v in values.max(axis=1)]


def id_conf(sim: ArrayLike) -> list[float | None]:
    """ID-Conf per reference: min(1, (s1 - s2) / s1) if s1 > 0 else 0.0. Higher = less confusion.

    Defined only when at least 2 faces were detected (N >= 2); otherwise every entry is None, meaning
    "this reference contributes no ID-Conf entry" (not a zero: averaging must skip it).
    """
    values = _values(sim)
    m, n = values.shape
    if n < 2:
        return [None] * m
    top2 = -np.sort(-values, axis=1)[:, :2]
    out: list[float | None] = []
    for s1, s2 in top2:
        out.append(float(min(1.0, (s1 - s2) / s1)) if s1 > 0 else 0.0)
    return out


def id_match(sim: ArrayLike) -> float:
    """ID-Match: mean similarity of the Hungarian-assigned (reference, face) pairs; 0.0 when M or N is 0."""
    values = _values(sim)
    rows, cols = hungarian(values)
    if rows.size == 0:
        return 0.0
    return float(values[rows, cols].mean())
