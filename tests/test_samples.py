"""Sample composition on hand-made groups: who becomes a target, which face becomes each reference, why not."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from umo.data.samples import FaceKey, compose_group, crop_box, people_prompt


@dataclass
class F:
    boxes: np.ndarray
    scores: np.ndarray
    embeddings: np.ndarray

    def sizes(self):
        return self.boxes[:, 2] - self.boxes[:, 0]


def unit(*v):
    v = np.array(v, np.float32)
    return v / np.linalg.norm(v)


A, B, C = unit(1, 0, 0), unit(0, 1, 0), unit(0, 0, 1)
A2, B2 = unit(1, 0.1, 0), unit(0.1, 1, 0)  # the same people in other photos (cos 0.995)


def img(*faces):
    """faces: (x, size, embedding, score)"""
    return F(np.array([[x, 10, x + s, 10 + s] for x, s, _, _ in faces], np.float32).reshape(-1, 4),
             np.array([sc for *_, sc in faces], np.float32), np.array([e for _, _, e, _ in faces], np.float32))


RULES = dict(max_identities=2, min_face_size=20, min_det_score=0.5, near_duplicate_threshold=0.999)


def test_targets_get_references_from_other_images_only_and_reasons_are_counted():
    faces = [
        img((100, 40, B, 0.9), (10, 40, A, 0.9)),   # 0: A and B (B on the right)
        img((10, 60, A2, 0.9)),                      # 1: A alone, larger face
        img((10, 30, B2, 0.9), (60, 30, C, 0.9)),    # 2: B and C; C's only other face is the same frame
        img(),                                        # 3: nobody
        img((10, 10, A, 0.9)),                       # 4: A, too small
        img((0, 30, A, 0.9), (40, 30, B, 0.9), (80, 30, C, 0.9)),  # 5: three people > N = 2
        img((10, 30, A, 0.9), (60, 30, A2, 0.9)),    # 6: two faces clustered as one person
    ]
    labels = [np.array(x) for x in ([1, 0], [0], [1, 2], [], [0], [0, 1, 2], [0, 0])]
    stats = Counter()
    out = compose_group(faces, labels, stats=stats, **RULES)
    by_target = {c.target: c for c in out}
    assert set(by_target) == {0, 1}
    first = by_target[0]
    assert first.target_faces == (1, 0) and first.identities == (0, 1)  # left to right: A then B
    assert first.references == (FaceKey(1, 0), FaceKey(2, 0))  # A's largest other face; B from image 2
    assert by_target[1].references == (FaceKey(0, 1),)  # the largest usable A elsewhere (image 4's is too small)
    # near-duplicates (the very same embedding): for target 0, A of images 5 and 6 and B of image 5; for
    # target 1, A2 of image 6; for target 2, C of image 5
    assert stats == Counter(target_no_reference=1, target_no_face=1, target_unusable_face=1,
                            target_too_many_faces=1, target_identity_conflict=1, reference_near_duplicate=5)


def test_near_duplicates_are_not_references():
    faces = [img((10, 40, A, 0.9)), img((10, 40, A, 0.9)), img((10, 30, A2, 0.9))]
    labels = [np.array([0])] * 3
    stats = Counter()
    out = compose_group(faces, labels, stats=stats, **RULES)
    assert out[0].references == (FaceKey(2, 0),)  # image 1 is the same frame again: skipped despite its size
    assert stats["reference_near_duplicate"] == 2


def test_prompt_and_crops():
    assert people_prompt("{people} at the beach", 1) == "person 1 at the beach"
    assert people_prompt("a photo of {people}", 2) == "a photo of person 1 and person 2"
    assert crop_box([0, 0, 20, 20], (100, 100), policy="face", margin=1.0) == (0, 0, 40, 40)  # clipped inside
    x1, y1, x2, y2 = crop_box([40, 20, 60, 40], (200, 200), policy="upper_body", margin=0.4)
    assert (x1, y1, x2, y2) == (28, 8, 72, 52)  # 2.2 sides square, 0.6 above the box top, 1.6 below it


def test_split_is_by_group_seeded_and_never_empty():
    from umo.data.samples import split_groups

    groups = [f"g{i}" for i in range(10)]
    train, test = split_groups(groups + groups, 0.2, seed=3)  # repeated names: still one group each
    assert len(test) == 2 and len(train) == 8 and not set(train) & set(test)
    assert (train, test) == split_groups(list(reversed(groups)), 0.2, seed=3)  # order of discovery is irrelevant
    assert split_groups(groups, 0.2, seed=4) != (train, test)
    assert split_groups(["only"], 0.5, seed=0) == (["only"], [])
    assert len(split_groups(groups[:3], 0.01, seed=0)[1]) == 1  # a positive fraction holds out a group
