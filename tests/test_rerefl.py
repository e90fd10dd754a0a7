"""The ReReFL step on the tiny FLUX.2 [klein] generator with the toy world's reward embedder.

The tiny random generator cannot draw faces, so the reward's detector is `FixedFaces` (faces at known places);
everything after detection is the real reward: differentiable warp, the toy ArcFace embedder, MIMR.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from umo.config import LoraConfig
from umo.faces.embed import load_arcface
from umo.models.flux2 import Flux2KleinGenerator
from umo.models.lora import add_lora, lora_parameters
from umo.reward import MatchingReward
from umo.toy.tiny.faces import FixedFaces
from umo.toy.world.identity import make_identity
from umo.toy.world.render import render_portrait
from umo.train.rerefl import Batch, rerefl_step

SIZE = 128
STEP = dict(sampler_steps=8, height=SIZE, width=SIZE)


@pytest.fixture()
def setup(tiny_generator_dir, toy_world):
    torch.manual_seed(0)
    gen = Flux2KleinGenerator.from_pretrained(tiny_generator_dir)
    lora = LoraConfig(rank=4, alpha=4.0)
    add_lora(gen.transformer, rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules, seed=0)
    return (gen, *batch_of_two(toy_world))


def batch_of_two(toy_world) -> tuple[MatchingReward, Batch]:
    """The reward (fixed faces at two places, the toy world's embedder) and one batch of two held-out people."""
    embedder = load_arcface(toy_world.reward_path, toy_world.config.reward.arch)
    reward = MatchingReward(FixedFaces([(36, 64), (92, 64)], 48), embedder)
    rng = np.random.default_rng(0)
    held_out = toy_world.config.n_train_identities
    portraits = [render_portrait(make_identity(0, held_out + k), rng, (SIZE, SIZE)).image for k in (3, 7)]
    refs = torch.from_numpy(np.stack(portraits)).permute(0, 3, 1, 2).float() / 127.5 - 1
    embeddings = torch.cat(reward.embed_references(refs, largest_only=True))
    small_refs = torch.nn.functional.interpolate(refs, size=(64, 64), mode="area")
    return reward, Batch(["two people side by side"], [list(small_refs)], [embeddings], torch.zeros(1, 3, SIZE, SIZE))


def fixed_draws() -> torch.Generator:
    return torch.Generator().manual_seed(123)


def test_reward_on_a_fixed_batch_rises_and_every_lora_parameter_moves(setup):
    improve(*setup)


def improve(gen, reward, batch, steps: int = 15) -> None:
    """`steps` ReReFL steps on the same draws: the reward on them rises, every LoRA parameter moves, the base
    never does. The tests of other families run it too."""
    base = {k: v.clone() for k, v in gen.transformer.state_dict().items() if "lora_" not in k}
    lora_before = {n: p.detach().clone() for n, p in gen.transformer.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(lora_parameters(gen.transformer), lr=1e-2, weight_decay=0.0)

    def evaluate() -> float:
        with torch.no_grad():
            return float(rerefl_step(gen, reward, batch, grad_step_range=[2, 2], diff_weight=0.0,
                                     generator=fixed_draws(), **STEP).reward)

    before = evaluate()
    for _ in range(steps):  # the same draws every step: gradient ascent on exactly the evaluated reward
        out = rerefl_step(gen, reward, batch, grad_step_range=[2, 2], diff_weight=0.0, generator=fixed_draws(),
                          **STEP)
        assert out.faces.tolist() == [2]
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = evaluate()
    assert after > before + 0.03, (before, after)

    for name, p in gen.transformer.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p.detach(), lora_before[name]), f"{name} did not change"
    for key, value in gen.transformer.state_dict().items():  # the base model never changes
        if "lora_" not in key:
            assert torch.equal(value, base[key]), key


def test_loss_is_lambda_diff_minus_reward_and_draws_are_replayable(setup):
    gen, reward, batch = setup
    a = rerefl_step(gen, reward, batch, grad_step_range=[1, 4], diff_weight=0.5, generator=fixed_draws(), **STEP)
    b = rerefl_step(gen, reward, batch, grad_step_range=[1, 4], diff_weight=0.5, generator=fixed_draws(), **STEP)
    assert float(a.loss.detach()) == pytest.approx(0.5 * float(a.diff_loss) - float(a.reward), abs=1e-6)
    assert float(a.diff_loss) > 0 and 1 <= a.grad_step <= 4
    assert a.scalars() == b.scalars()  # one RNG drives every draw: a resumed run replays them
    assert a.reward == pytest.approx(float(a.matched + a.unmatched), abs=1e-6)
    a.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in gen.transformer.named_parameters() if p.requires_grad and "lora_B" in n)


def test_reward_weight_zero_is_sft_with_the_reward_still_measured(setup):
    """The ablation's SFT arm: the loss is lambda * L_diff alone and its gradient is L_diff's; the reward is the
    same number the ReReFL step measures on the same draws."""
    gen, reward, batch = setup
    full = rerefl_step(gen, reward, batch, grad_step_range=[1, 4], diff_weight=0.5, generator=fixed_draws(), **STEP)
    sft = rerefl_step(gen, reward, batch, grad_step_range=[1, 4], diff_weight=0.5, reward_weight=0.0,
                      generator=fixed_draws(), **STEP)
    assert float(sft.loss.detach()) == pytest.approx(0.5 * float(sft.diff_loss), abs=1e-7)
    assert float(sft.reward) == pytest.approx(float(full.reward), abs=1e-6) and sft.grad_step == full.grad_step
    sft.loss.backward()
    lora = [(n, p) for n, p in gen.transformer.named_parameters() if p.requires_grad]
    got = [p.grad.clone() for _, p in lora]
    assert all(g.abs().sum() > 0 for g, (n, _) in zip(got, lora) if "lora_B" in n)  # L_diff alone trains
    gen.transformer.zero_grad(set_to_none=True)
    full.loss.backward()  # the reward's gradient is what SFT lacks: the two differ
    assert any(not torch.equal(a, p.grad) for a, (_, p) in zip(got, lora, strict=True))


def test_grad_step_range_counts_remaining_steps(setup):
    gen, reward, batch = setup
    seen = {rerefl_step(gen, reward, batch, grad_step_range=[8, 8], diff_weight=0.0,
                        generator=torch.Generator().manual_seed(s), **STEP).sigma for s in range(2)}
    assert seen == {1.0}  # t = T remaining steps: the gradient step is the very first, at sigma 1
