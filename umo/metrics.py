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

Against a ground-truth target (MultiID-Bench's definitions, on embeddings): Sim(GT) is the mean similarity of
the generated faces Hungarian-matched to the target's faces, and copy-paste CP compares, for each generated face
g, its angle to its matched target face t with its angle to its matched reference r:

    CP(g) = (θ(g, t) - θ(g, r)) / θ(t, r),   θ(a, b) = arccos(cos(a, b)),   0 when θ(t, r) is about 0

g is matched to t (generated x target faces) and to r (generated x references) by two separate Hungarian
assignments. Both are defined only when the generated image, the target and the references hold the same number
of faces (None otherwise: "not measured", never 0). CP near 1: g sits at the reference photo rather than at the
person as the target shows them; near -1: at the target.
"""

from __future__ import annotations

import numpy as np

from umo.reward import ArrayLike, check_similarity, hungarian

ANGLE_EPS = 1e-6  # radians: below it, the target and the reference are the same point and CP is 0


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


def _unit(x: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x, np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected (K, D) face embeddings, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains NaN or inf")
    return arr / np.maximum(np.linalg.norm(arr, axis=1, keepdims=True), 1e-12)


def angles(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """θ (radians) between every row of a (K, D) and every row of b (L, D): (K, L), arccos of the clipped cosine."""
    return np.arccos(np.clip(_unit(a, "a") @ _unit(b, "b").T, -1.0, 1.0))


def sim_gt(generated: ArrayLike, target: ArrayLike) -> float | None:
    """Sim(GT): the mean cosine of the Hungarian-matched (generated face, target face) pairs; None unless both
    hold the same number of faces, at least one."""
    return against_target(generated, target, None)[0]


def copy_paste(generated: ArrayLike, target: ArrayLike, references: ArrayLike) -> list[float] | None:
    """CP of each generated face (see the module docstring), in the generated faces' order; None unless the
    generated faces, the target's faces and the references are equally many, at least one.

    Generated faces at 0 and 10 degrees, target faces at 20 and 40, references at 5 and 60 (unit vectors in a
    plane, so θ is the difference of angles). The Hungarian matches g1 to t1 and r1, g2 to t2 and r2 (a greedy
    choice would give both faces r1): CP(g1) = (20 - 5) / 15 = 1, CP(g2) = (30 - 50) / 20 = -1.

    >>> at = lambda *deg: [[np.cos(np.radians(d)), np.sin(np.radians(d))] for d in deg]
    >>> [round(v, 6) for v in copy_paste(at(0, 10), at(20, 40), at(5, 60))]
    [1.0, -1.0]
    """
    return against_target(generated, target, references)[1]


def against_target(generated: ArrayLike, target: ArrayLike, references: ArrayLike | None
                   ) -> tuple[float | None, list[float] | None]:
    """(Sim(GT), CP per generated face) of one image, the (generated, target) assignment solved once for both;
    each None where its counts disagree (see sim_gt, copy_paste). references None: Sim(GT) only."""
    g, t = _unit(generated, "generated"), _unit(target, "target")
    if len(g) == 0 or len(g) != len(t):
        return None, None
    sim = g @ t.T
    # matched on cosine similarity, as every assignment in umo (the smallest total angle can pick other pairs)
    rows, cols = hungarian(sim)
    target_of = dict(zip(rows, cols))
    score = float(sim[rows, cols].mean())
    if references is None:
        return score, None
    r = _unit(references, "references")
    if len(r) != len(g):
        return score, None
    gt, gr, tr = angles(g, t), angles(g, r), angles(t, r)
    reference_of = dict(zip(*hungarian(g @ r.T)))
    out = []
    for k in range(len(g)):
        j, i = target_of[k], reference_of[k]
        out.append(0.0 if tr[j, i] < ANGLE_EPS else float((gt[k, j] - gr[k, i]) / tr[j, i]))
    return score, out
