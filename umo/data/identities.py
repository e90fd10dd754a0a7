"""Identities: the faces of each group clustered into people, and how well that matches a ground truth.

Within one group (a video, an album, an event) the same person recurs; across groups identities are not
linked. Threshold agglomerative clustering (scipy, average linkage) on cosine distance: two clusters merge
while their mean similarity is >= `threshold`.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist, squareform

CANNOT_LINK = 10.0  # distance given to two faces of one image: one person appears once per image


def cluster_faces(embeddings: np.ndarray, threshold: float, images: list | None = None) -> np.ndarray:
    """(N, D) L2-normalized embeddings -> (N,) cluster labels 0..C-1.

    scipy's average linkage on cosine distance, cut where the mean similarity between two clusters drops below
    `threshold`. `images` (N,) names each face's image: faces of one image get a prohibitive distance, so a
    cluster almost never holds two faces of the same photo (on the toy world this lifts purity from 0.84 to
    0.97 at the same completeness).

    >>> e = np.array([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0]])
    >>> cluster_faces(e / np.linalg.norm(e, axis=1, keepdims=True), 0.5).tolist()
    [0, 0, 1]
    >>> cluster_faces(e / np.linalg.norm(e, axis=1, keepdims=True), 0.5, images=["a", "a", "b"]).tolist()
    [0, 1, 2]
    """
    n = len(embeddings)
    if n <= 1:
        return np.zeros(n, dtype=np.int64)
    distances = np.clip(pdist(np.asarray(embeddings, np.float64), "cosine"), 0.0, 2.0)
    if images is not None:
        owner = np.asarray(images)
        same = squareform(owner[:, None] == owner[None, :], checks=False)
        distances[same] = CANNOT_LINK
    labels = fcluster(linkage(distances, method="average"), t=1.0 - threshold, criterion="distance")
    # relabel by first appearance, so labels are stable under the input order
    order = {lab: k for k, lab in enumerate(dict.fromkeys(labels.tolist()))}
    return np.array([order[lab] for lab in labels], dtype=np.int64)


def purity_completeness(predicted: list, truth: list) -> tuple[float, float]:
    """Cluster purity (each cluster's majority truth label share) and completeness (each true identity's
    largest share in one cluster), both weighted by faces.

    >>> purity_completeness(["a", "a", "b", "b"], [1, 1, 1, 2])
    (0.75, 0.75)
    """
    if not predicted:
        return 1.0, 1.0
    pairs = Counter(zip(predicted, truth))
    by_cluster: dict = {}
    by_truth: dict = {}
    for (p, t), n in pairs.items():
        by_cluster[p] = max(by_cluster.get(p, 0), n)
        by_truth[t] = max(by_truth.get(t, 0), n)
    total = len(predicted)
    return sum(by_cluster.values()) / total, sum(by_truth.values()) / total


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) x (M, 4) boxes x1 y1 x2 y2 -> (N, M) IoU."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def match_truth(boxes: np.ndarray, truth_boxes: np.ndarray, truth_ids: list, min_iou: float = 0.5) -> list:
    """The ground-truth identity of each detected box (greedy by IoU, one truth face per box), None if none."""
    out: list = [None] * len(boxes)
    if len(boxes) == 0 or len(truth_boxes) == 0:
        return out
    iou = box_iou(boxes, truth_boxes)
    for flat in np.argsort(-iou, axis=None):
        i, j = np.unravel_index(flat, iou.shape)
        if iou[i, j] < min_iou:
            break
        if out[i] is None and truth_ids[j] is not None:
            out[i] = truth_ids[j]
            truth_ids = [*truth_ids[:j], None, *truth_ids[j + 1:]]
    return out
