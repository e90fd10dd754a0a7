"""ID-Sim, ID-Conf and ID-Match on hand-worked matrices (docs/method.md's definitions, unscaled)."""

import numpy as np
import pytest
import torch

from umo.metrics import id_conf, id_match, id_sim


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
