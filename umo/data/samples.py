"""Composing multi-reference samples from one group's indexed, clustered faces (pure: no files touched).

A sample = a target image with 1..N identities + for each identity ONE reference face taken from ANOTHER image
of the same group. Rules, each rejection counted by reason:

- a face is usable when its box side >= min_face_size and its score >= min_det_score;
- a target needs every detected face usable (an unusable stranger would be drawn but never rewarded):
  else `target_unusable_face`; no face: `target_no_face`; more than N: `target_too_many_faces`; two faces
  clustered as one identity: `target_identity_conflict`;
- a reference candidate is a usable face of the identity in another image, and for a video frame in another
  shot of its video (never the target's own shot: its pose, light and expression); one whose similarity to the target's
  face is >= near_duplicate_threshold is a near-duplicate frame (`reference_near_duplicate`, candidate
  dropped); among the rest the largest face wins (ties: the earliest image); an identity left with none
  rejects the target (`target_no_reference`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FaceKey:
    image: int  # index into the group's image list
    face: int  # index into that image's faces


@dataclass(frozen=True)
class Composed:
    target: int
    target_faces: tuple[int, ...]  # left to right
    identities: tuple[int, ...]  # cluster label per target face
    references: tuple[FaceKey, ...]  # one per identity, same order


def usable(sizes: np.ndarray, scores: np.ndarray, *, min_face_size: float, min_det_score: float) -> np.ndarray:
    return (np.asarray(sizes) >= min_face_size) & (np.asarray(scores) >= min_det_score)


def compose_group(faces: list, labels: list[np.ndarray], *, max_identities: int, min_face_size: float,
                  min_det_score: float, near_duplicate_threshold: float, stats: Counter,
                  clips: list | None = None) -> list[Composed]:
    """faces: per image an object with boxes (K, 4), scores (K,), embeddings (K, D) and sizes() (K,);
    labels: per image (K,) identity cluster labels; clips: per image its clip (a video frame's shot), None = each
    image its own. A reference never comes from the target's clip. Returns the group's samples, in image order."""
    clips = [c if c is not None else ("image", i) for i, c in enumerate(clips or [None] * len(faces))]
    ok = [usable(f.sizes(), f.scores, min_face_size=min_face_size, min_det_score=min_det_score) for f in faces]
    by_identity: dict[int, list[FaceKey]] = {}
    for i, (lab, good) in enumerate(zip(labels, ok)):
        for k, (identity, g) in enumerate(zip(lab.tolist(), good.tolist())):
            if g:
                by_identity.setdefault(identity, []).append(FaceKey(i, k))
    out = []
    for i, f in enumerate(faces):
        n = len(f.scores)
        if n == 0:
            stats["target_no_face"] += 1
            continue
        if not ok[i].all():
            stats["target_unusable_face"] += 1
            continue
        if n > max_identities:
            stats["target_too_many_faces"] += 1
            continue
        ids = labels[i].tolist()
        if len(set(ids)) != n:
            stats["target_identity_conflict"] += 1
            continue
        order = np.argsort(f.boxes[:, 0], kind="stable").tolist()  # left to right, as captions name people
        refs = []
        for k in order:
            best, best_size = None, -1.0
            for cand in by_identity.get(ids[k], []):
                if clips[cand.image] == clips[i]:  # the target itself, or another frame of its shot
                    continue
                sim = float(np.dot(faces[cand.image].embeddings[cand.face], f.embeddings[k]))
                if sim >= near_duplicate_threshold:
                    stats["reference_near_duplicate"] += 1
                    continue
                size = float(faces[cand.image].sizes()[cand.face])
                if size > best_size:
                    best, best_size = cand, size
            if best is None:
                break
            refs.append(best)
        if len(refs) != n:
            stats["target_no_reference"] += 1
            continue
        out.append(Composed(i, tuple(order), tuple(ids[k] for k in order), tuple(refs)))
    return out


def people_prompt(template: str, n: int) -> str:
    """The template with {people} naming n people in order.

    >>> people_prompt("a photo of {people}", 3)
    'a photo of person 1, person 2 and person 3'
    """
    names = [f"person {k + 1}" for k in range(n)]
    people = names[0] if n == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return template.format(people=people)


def crop_box(box, image_hw: tuple[int, int], *, policy: str, margin: float) -> tuple[int, int, int, int]:
    """A square crop (x1, y1, x2, y2) around a face box: the box plus `margin` of its side ("face"), or head and
    shoulders ("upper_body": 2.2 sides square, from 0.6 side above the box top down to 1.6 sides below it),
    moved inside the image (and shrunk only if the image is smaller).

    >>> crop_box([40, 40, 60, 60], (100, 100), policy="face", margin=0.5)
    (35, 35, 65, 65)
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    side = max(x2 - x1, y2 - y1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    if policy == "upper_body":
        half = 1.1 * side
        cy = y1 - 0.6 * side + half
    else:
        half = side * (1 + margin) / 2
    h, w = image_hw
    half = min(half, w / 2, h / 2)
    cx, cy = min(max(cx, half), w - half), min(max(cy, half), h - half)
    return int(round(cx - half)), int(round(cy - half)), int(round(cx + half)), int(round(cy + half))


def split_groups(groups: list[str], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split by GROUP (never by image): a seeded shuffle, the first round(fraction x n) groups are test (at least
    one when the fraction is > 0 and there are two groups or more). Returns (train, test), each sorted.

    >>> split_groups(["a", "b", "c", "d", "e"], 0.4, seed=0)
    (['a', 'b', 'd'], ['c', 'e'])
    """
    names = sorted(set(groups))
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    n_test = int(round(test_fraction * len(names)))
    if test_fraction > 0 and len(names) >= 2:
        n_test = min(max(n_test, 1), len(names) - 1)
    return sorted(order[n_test:]), sorted(order[:n_test])


def linked_to(centroids: np.ndarray, others: np.ndarray, threshold: float) -> np.ndarray:
    """Which identities match any of `others` (the same person seen in another split's group). (M,) bool.

    Rows are the means of each identity's unit face embeddings, so a dot product is the mean cosine similarity
    over all pairs of their faces (the average linkage the clustering uses); a match is >= threshold.

    >>> linked_to(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[0.6, 0.8]]), 0.7).tolist()
    [False, True]
    """
    if len(centroids) == 0 or len(others) == 0:
        return np.zeros(len(centroids), dtype=bool)
    return (np.asarray(centroids) @ np.asarray(others).T).max(axis=1) >= threshold
