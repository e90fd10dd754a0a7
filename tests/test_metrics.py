"""ID-Sim, ID-Conf and ID-Match on hand-worked matrices, Sim(GT) and copy-paste on hand-placed embeddings
(docs/method.md's definitions, unscaled)."""

import numpy as np
import pytest
import torch

from umo.metrics import copy_paste, id_conf, id_match, id_sim, sim_gt


def approx(values):
    return [None if v is None else pytest.approx(v, abs=1e-12) for v in values]


def test_more_references_than_faces():
    sim = [[0.9, 0.1], [0.2, 0.8], [0.7, 0.6]]
    assert id_sim(sim) == approx([0.9, 0.8, 0.7])
    # (0.9 - 0.1) / 0.9, (0.8 - 0.2) / 0.8, (0.7 - 0.6) / 0.7
    assert id_conf(sim) == approx([0.8 / 0.9, 0.75, 0.1 / 0.7])
    # assignment (0,0), (1,1)
    assert id_match(sim) == pytest.approx(0.85)


def test_confused_pair():
    # Both references resemble face 1 best: ID-Sim is high for both, ID-Conf is low, ID-Match uses (0,1),(1,0).
    sim = [[0.5, 0.9, 0.4], [0.6, 0.85, 0.1]]
    assert id_sim(sim) == approx([0.9, 0.85])
    assert id_conf(sim) == approx([0.4 / 0.9, 0.25 / 0.85])
    assert id_match(sim) == pytest.approx(0.75)


def test_clipped_at_one_and_non_positive_best():
    # s2 < 0 makes (s1 - s2) / s1 > 1: clipped to 1. s1 <= 0 gives 0 by definition.
    assert id_conf([[0.4, -0.6], [-0.2, -0.5], [0.0, -0.1]]) == approx([1.0, 0.0, 0.0])


def test_ties_give_zero_confidence():
    assert id_conf([[0.5, 0.5], [0.5, 0.5]]) == approx([0.0, 0.0])


def test_fewer_than_two_faces_has_no_conf_entry():
    assert id_conf([[0.7], [0.2]]) == [None, None]
    assert id_sim([[0.7], [0.2]]) == approx([0.7, 0.2])
    assert id_match([[0.7], [0.2]]) == pytest.approx(0.7)


def test_no_faces():
    sim = np.zeros((3, 0))
    assert id_sim(sim) == [0.0, 0.0, 0.0]
    assert id_conf(sim) == [None, None, None]
    assert id_match(sim) == 0.0
    assert id_sim(np.zeros((0, 2))) == [] and id_conf(np.zeros((0, 2))) == [] and id_match(np.zeros((0, 2))) == 0.0


def test_single_pair():
    assert id_sim([[0.3]]) == approx([0.3]) and id_conf([[0.3]]) == [None] and id_match([[0.3]]) == pytest.approx(0.3)


def test_torch_input_matches_numpy():
    sim = np.random.default_rng(1).uniform(-1, 1, (3, 4))
    t = torch.tensor(sim, requires_grad=True)
    assert id_sim(t) == approx(id_sim(sim))
    assert id_conf(t) == approx(id_conf(sim))
    assert id_match(t) == pytest.approx(id_match(sim))


def test_non_finite_rejected():
    with pytest.raises(ValueError, match="NaN or inf"):
        id_sim([[np.nan, 0.1]])
    with pytest.raises(ValueError, match="2-D"):
        id_conf(np.zeros(4) + 0.1)


def at(*degrees: float) -> np.ndarray:
    """Unit vectors in a plane at these angles, padded to 4-D: θ between two of them is their difference."""
    rad = np.radians(degrees)
    return np.stack([np.cos(rad), np.sin(rad), np.zeros_like(rad), np.zeros_like(rad)], axis=1)


def test_copy_paste_where_the_hungarian_and_a_greedy_choice_differ():
    # generated faces at 0 and 10 degrees; both are closest to reference r1 (5): a greedy choice gives both r1.
    # The Hungarian maximizes the total cosine: g1-r1 + g2-r2 = cos 5 + cos 50 = 1.6390 > cos 60 + cos 5 = 1.4962.
    # Targets at 20 and 40: g1-t1 + g2-t2 = cos 20 + cos 30 = 1.8057 > cos 40 + cos 10 = 1.7508.
    # CP(g1) = (θ(g1,t1) - θ(g1,r1)) / θ(t1,r1) = (20 - 5) / 15 = 1; CP(g2) = (30 - 50) / 20 = -1.
    assert copy_paste(at(0, 10), at(20, 40), at(5, 60)) == [pytest.approx(1.0), pytest.approx(-1.0)]
    # greedy would have given g2 the reference r1: (30 - 5) / 35 = 0.714 (what the Hungarian must not do)
    assert copy_paste(at(10), at(40), at(5)) == [pytest.approx(25 / 35)]
    # the faces' order is the generated image's: swapping them swaps the values
    assert copy_paste(at(10, 0), at(20, 40), at(5, 60)) == [pytest.approx(-1.0), pytest.approx(1.0)]


def test_copy_paste_is_zero_where_target_and_reference_coincide():
    # θ(t, r) = 0: the reference photo is the target's face; CP is 0 by definition, not a division by zero
    assert copy_paste(at(30), at(12), at(12)) == [0.0]
    # and a face halfway between target (0) and reference (40) scores 0; at the reference 1, at the target -1
    assert copy_paste(at(20), at(0), at(40)) == [pytest.approx(0.0)]
    assert copy_paste(at(40), at(0), at(40)) == [pytest.approx(1.0)]
    assert copy_paste(at(0), at(0), at(40)) == [pytest.approx(-1.0)]


def test_copy_paste_and_sim_gt_need_equal_face_counts():
    two, three = at(0, 90), at(0, 90, 180)
    assert copy_paste(three, two, two) is None  # a face too many in the generated image
    assert copy_paste(two, three, two) is None  # in the target
    assert copy_paste(two, two, at(0)) is None  # a reference short
    assert copy_paste(np.zeros((0, 4)), np.zeros((0, 4)), np.zeros((0, 4))) is None  # no face at all
    assert sim_gt(three, two) is None and sim_gt(np.zeros((0, 4)), np.zeros((0, 4))) is None


def test_sim_gt_is_the_hungarian_mean_cosine():
    # generated at 0 and 10, target at 5 and 80: g1-t1 + g2-t2 = cos 5 + cos 70 = 1.3382 > cos 80 + cos 5 = 1.1698
    assert sim_gt(at(0, 10), at(5, 80)) == pytest.approx((np.cos(np.radians(5)) + np.cos(np.radians(70))) / 2)
    # embeddings need not be unit length; the judge's are, a caller's may not be
    assert sim_gt(3 * at(0), 0.5 * at(60)) == pytest.approx(0.5)


def test_embeddings_are_validated():
    with pytest.raises(ValueError, match="generated: expected \\(K, D\\)"):
        copy_paste(np.zeros(4), at(0), at(0))
    with pytest.raises(ValueError, match="target: contains NaN"):
        sim_gt(at(0), np.full((1, 4), np.nan))
