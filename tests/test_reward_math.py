"""MIMR and SIR on hand-worked similarity matrices, against brute force, and their gradients."""

import itertools

import numpy as np
import pytest
import torch

from umo.reward import hungarian, matching_reward, matching_weights, single_identity_reward

# (sim, MIMR, SIR), each worked out by hand in the comment beside it.
CASES = {
    # 1 x 1: the only pair is assigned.
    "1x1": ([[0.7]], 0.7, 0.7),
    # 2 x 2: assignment (0,0),(1,1) = 1.7 beats 0.5; R = (0.9 + 0.8 - 0.2 - 0.3) / 4.
    "2x2": ([[0.9, 0.2], [0.3, 0.8]], 0.3, 0.85),
    # M > N: rows 0,1 take cols 0,1 (1.7); reference 2 is unassigned and all its pairs count -1.
    # R = (1.7 - (3.3 - 1.7)) / 6.
    "3x2": ([[0.9, 0.1], [0.2, 0.8], [0.7, 0.6]], 0.1 / 6, 0.8),
    # M < N, the confusion case: both references prefer face 1, SIR pays both (0.875), MIMR assigns
    # (0,1),(1,0) = 1.5 against a total of 3.35: R = (1.5 - 1.85) / 6.
    "2x3": ([[0.5, 0.9, 0.4], [0.6, 0.85, 0.1]], -0.35 / 6, 0.875),
    # Ties: every assignment totals 1.0; R = (1.0 - 1.0) / 4 whichever one scipy picks.
    "ties": ([[0.5, 0.5], [0.5, 0.5]], 0.0, 0.5),
    # A tie in one row: (0,0),(1,1) = 1.6 beats 1.1; R = (1.6 - 1.1) / 4.
    "row tie": ([[0.8, 0.8], [0.3, 0.8]], 0.125, 0.8),
    # Negative similarities: (0,0),(1,1) = -0.3 beats -0.9; R = (-0.3 + 0.9) / 4.
    "negative": ([[-0.2, -0.5], [-0.4, -0.1]], 0.15, -0.15),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hand_worked(name):
    sim, mimr, sir = CASES[name]
    assert matching_reward(sim) == pytest.approx(mimr, abs=1e-12)
    assert single_identity_reward(sim) == pytest.approx(sir, abs=1e-12)
    t = torch.tensor(sim, dtype=torch.float64)
    assert float(matching_reward(t)) == pytest.approx(mimr, abs=1e-12)
    assert float(single_identity_reward(t)) == pytest.approx(sir, abs=1e-12)


def test_custom_weights():
    # (2 * 1.7 - 0.5 * 0.5) / 4
    got = matching_reward([[0.9, 0.2], [0.3, 0.8]], matched_weight=2.0, unmatched_weight=-0.5)
    assert got == pytest.approx(0.7875)


def test_weights_rectangular():
    w = matching_weights(np.array([[0.5, 0.9, 0.4], [0.6, 0.85, 0.1]]))
    np.testing.assert_array_equal(w, [[-1, 1, -1], [1, -1, -1]])


@pytest.mark.parametrize("shape", [(0, 0), (2, 0), (0, 3)])
def test_empty_is_zero(shape):
    assert matching_reward(np.zeros(shape)) == 0.0
    assert single_identity_reward(np.zeros(shape)) == 0.0
    t = torch.zeros(shape, requires_grad=True)
    r = matching_reward(t)
    assert float(r) == 0.0 and r.shape == () and not r.requires_grad
    assert float(single_identity_reward(t)) == 0.0
    assert matching_reward([]) == 0.0


def test_against_brute_force():
    """MIMR equals the best (2 * assigned - total) / MN over every injective assignment."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        m, n = (int(v) for v in rng.integers(1, 5, size=2))
        sim = rng.uniform(-1, 1, size=(m, n)).round(2)  # rounding makes ties common
        best = -np.inf
        k = min(m, n)
        for rows in itertools.permutations(range(m), k):
            for cols in itertools.combinations(range(n), k):
                best = max(best, sim[list(rows), list(cols)].sum())
        expected = (2 * best - sim.sum()) / (m * n)
        assert matching_reward(sim) == pytest.approx(expected, abs=1e-12)
        rows, cols = hungarian(sim)
        assert len(rows) == k and len(set(rows)) == k and len(set(cols)) == k


def test_gradient_is_weights_over_mn():
    sim = torch.tensor([[0.5, 0.9, 0.4], [0.6, 0.85, 0.1]], dtype=torch.float64, requires_grad=True)
    matching_reward(sim).backward()
    expected = torch.tensor([[-1, 1, -1], [1, -1, -1]], dtype=torch.float64) / 6
    torch.testing.assert_close(sim.grad, expected)


def test_gradcheck():
    gen = torch.Generator().manual_seed(0)
    for shape in [(1, 1), (3, 2), (2, 4), (4, 4)]:
        # Distinct values keep the assignment locally constant, so the reward is smooth around `sim`.
        sim = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
        sim.requires_grad_(True)
        assert torch.autograd.gradcheck(matching_reward, (sim,))
        assert torch.autograd.gradcheck(single_identity_reward, (sim,))


def test_float32_and_dtype_preserved():
    sim = torch.tensor([[0.9, 0.2], [0.3, 0.8]], dtype=torch.float32)
    r = matching_reward(sim)
    assert r.dtype == torch.float32 and float(r) == pytest.approx(0.3, abs=1e-6)


@pytest.mark.parametrize(
    "bad, message",
    [
        ([[0.1, float("nan")]], "NaN or inf"),
        ([[0.1, float("inf")]], "NaN or inf"),
        ([0.1, 0.2], "2-D"),
        (np.zeros((2, 2, 2)), "2-D"),
    ],
)
def test_bad_input(bad, message):
    with pytest.raises(ValueError, match=message):
        matching_reward(bad)
    with pytest.raises(ValueError, match=message):
        single_identity_reward(torch.as_tensor(np.asarray(bad, dtype=np.float64)))
