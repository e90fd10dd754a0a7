"""One ReReFL step (docs/method.md, "ReReFL: one training step"), on any `umo.models.Generator`.

    1. L_diff: flow matching on the sample's target image, x_t = (1 - s) x0 + s * noise, target
       v = noise - x0, MSE; s drawn uniformly and shifted as the base model's sampler shifts.
    2. t ~ U{T_s..T_e}, counted as REMAINING steps of a T-step sampler.
    3. From pure noise, sample with the current weights and no gradient down to step t (index T - t).
    4. One transformer call at step t WITH gradient; x0_hat = x_t - sigma_t * v; VAE decode with gradient.
    5. R = reward(image; cached reference embeddings) (MIMR or SIR); loss = lambda * L_diff - w * mean(R).
    6. Optional anchor (`train.anchor_weight`, beta; off at 0): beta * MSE(v_LoRA, v_base) at the gradient step,
       the frozen base's velocity on the same x_t (adapters off, no gradient): the "KL to the pretrained model"
       of RL fine-tuning for flow models, which pulls the LoRA back where the reward alone would let it drift.

w = 0 (`train.reward_weight`) is supervised flow matching alone, the ablation's SFT arm: steps 2-5 still run,
without gradient, so the reward is measured on the same draws and logged like the other arms'.

Gradient path: LoRA <- the step-t forward <- VAE decode <- the reward's differentiable warp <- embedder.
No gradient through the earlier sampler steps, detection, the assignment or the reference embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from umo.models.base import Generator, euler_step, predict_x0
from umo.models.lora import adapters_disabled

METRICS = ("reward", "reward_matched", "reward_unmatched", "diff_loss", "faces_per_sample", "loss", "grad_step",
           "anchor_loss")
"""The scalars of a step that the trainer logs (`StepOutput.scalars`, in this order): means over micro-batches,
then processes. The first, the reward, is the one the progress bar shows."""
SUMMARY_METRICS = tuple(k for k in METRICS if k not in ("loss", "grad_step"))
"""Those train_metrics.json reports as final_<name> (the loss's scale depends on the weights; grad_step is a
random draw)."""


@dataclass
class Batch:
    """B training samples, bucketed so that they share a reference layout.

    prompts: B captions; references: per sample its reference images (3, h, w) in [-1, 1] (the generator's
    conditioning); reference_embeddings: per sample (M_i, D) L2-normalized identity embeddings (cached by
    data prep; the reward's side); targets: (B, 3, H, W) in [-1, 1], the sample's real image (for L_diff);
    reference_files: per sample its reference image files, when known (the judge's check and the pictures of the
    matching read them at full size).
    """

    prompts: list[str]
    references: list[list[torch.Tensor]]
    reference_embeddings: list[torch.Tensor]
    targets: torch.Tensor
    reference_files: list[list[Path]] | None = None

    def __post_init__(self) -> None:
        n = len(self.prompts)
        if not (len(self.references) == len(self.reference_embeddings) == self.targets.shape[0] == n):
            raise ValueError(f"batch: {n} prompts, {len(self.references)} reference lists, "
                             f"{len(self.reference_embeddings)} embedding sets, {self.targets.shape[0]} targets")

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.prompts, [[r.to(device) for r in refs] for refs in self.references],
                     [e.to(device) for e in self.reference_embeddings], self.targets.to(device), self.reference_files)


@dataclass
class StepOutput:
    """What one ReReFL step computed; `loss` carries the gradient, the rest is detached for logging."""

    loss: torch.Tensor
    diff_loss: torch.Tensor
    reward: torch.Tensor  # mean over the batch
    matched: torch.Tensor
    unmatched: torch.Tensor
    faces: torch.Tensor  # (B,) faces scored per sample
    grad_step: int  # t, remaining steps
    sigma: float  # noise level of the gradient step
    images: torch.Tensor = field(repr=False)  # (B, 3, H, W) decoded x0_hat, detached
    anchor: torch.Tensor | None = None  # MSE(v_LoRA, v_base) at the gradient step; None when off
    rewards: torch.Tensor | None = field(default=None, repr=False)  # (B,) per sample, detached
    similarities: list[torch.Tensor] = field(default_factory=list, repr=False)  # B (M_i, N_i), reward embedder
    boxes: list = field(default_factory=list, repr=False)  # B (N_i, 4) boxes of the scored faces, pixels

    def scalars(self) -> dict[str, float]:
        """METRICS by name, then sigma (a diagnostic the trainer does not log)."""
        anchor = self.anchor if self.anchor is not None else torch.zeros(())
        values = (self.reward, self.matched, self.unmatched, self.diff_loss, self.faces.float().mean(),
                  self.loss.detach(), self.grad_step, anchor)
        return dict(zip(METRICS, map(float, values), strict=True)) | {"sigma": self.sigma}


def draw_grad_step(grad_step_range: Sequence[int], generator: torch.Generator) -> int:
    """t ~ uniform integer in [T_s, T_e] (inclusive)."""
    lo, hi = int(grad_step_range[0]), int(grad_step_range[1])
    return int(torch.randint(lo, hi + 1, (1,), generator=generator))


def rerefl_step(model: Generator, reward, batch: Batch, *, sampler_steps: int, grad_step_range: Sequence[int],
                diff_weight: float, height: int, width: int, generator: torch.Generator,
                reward_weight: float = 1.0, anchor_weight: float = 0.0, grad_step: int | None = None,
                timer: Callable[[str], AbstractContextManager] | None = None) -> StepOutput:
    """Compute the ReReFL loss of one batch (see the module docstring); call .backward() on `.loss`.

    reward: a `umo.reward.MatchingReward` (or anything with its `compute(images, references)`).
    generator: the torch RNG for every random draw of the step (noise, t, L_diff time), so a resumed run
    replays the same draws.
    grad_step: t, when the caller drew it (a sharded run draws it alike on every process); else from `generator`.
    timer: phase(name) context manager for benchmarks; phases: condition, diff_loss, sampling, grad_step,
    decode, reward, anchor.
    """
    phase = timer or (lambda name: nullcontext())
    device = batch.targets.device
    with phase("condition"):
        cond = model.condition(batch.prompts, batch.references, height=height, width=width)
    b = cond.batch_size

    # 1. L_diff on the targets
    diff_loss = torch.zeros((), device=device)
    if diff_weight:
        with phase("diff_loss"):
            x0 = model.encode(batch.targets, cond)
            noise = torch.randn(x0.shape, generator=generator).to(x0)
            s = model.shift(torch.rand(b, generator=generator), sampler_steps, cond).to(x0)
            x_t = (1 - s.view(-1, 1, 1)) * x0 + s.view(-1, 1, 1) * noise
            diff_loss = F.mse_loss(model.velocity(x_t, s, cond).float(), (noise - x0).float())

    # 2-3. t and the no-grad approach to it
    t = draw_grad_step(grad_step_range, generator) if grad_step is None else int(grad_step)
    sigmas = model.sigmas(sampler_steps, cond)
    k = sampler_steps - t  # sampler steps taken before the gradient step
    x = model.initial_latents(cond, generator)
    with phase("sampling"), torch.no_grad():
        for i in range(k):
            x = euler_step(x, model.velocity(x, sigmas[i], cond), sigmas[i], sigmas[i + 1])

    # 4. the gradient step, x0_hat, decode (no graph when the reward only is measured: w = 0)
    sigma = sigmas[k]
    with nullcontext() if reward_weight or anchor_weight else torch.no_grad():
        with phase("grad_step"):
            v = model.velocity(x, sigma, cond)
    anchor = None
    if anchor_weight:  # 6. the frozen base on the same x_t
        with phase("anchor"), torch.no_grad(), adapters_disabled(model.transformer):
            v_base = model.velocity(x, sigma, cond)
        anchor = F.mse_loss(v.float(), v_base.float())
    with nullcontext() if reward_weight else torch.no_grad():
        x0_hat = predict_x0(x, v, sigma)
        with phase("decode"):
            images = model.decode(x0_hat, cond)

        # 5. reward and loss
        with phase("reward"):
            out = reward.compute(images, [e.to(images.device) for e in batch.reference_embeddings])
    loss = diff_weight * diff_loss
    if anchor is not None:
        loss = loss + anchor_weight * anchor
    if reward_weight:
        # + 0 * x0_hat: the loss always has a graph through the gradient step (a zero gradient when no face was
        # scored), so every process of a distributed run takes the same backward and all-reduce.
        loss = loss - reward_weight * out.rewards.mean() + 0.0 * x0_hat.sum()
    return StepOutput(loss=loss, diff_loss=diff_loss.detach(), reward=out.rewards.detach().mean(),
                      matched=out.matched.mean(), unmatched=out.unmatched.mean(), faces=out.faces, grad_step=t,
                      sigma=float(sigma), images=images.detach(),
                      anchor=None if anchor is None else anchor.detach(), rewards=out.rewards.detach(),
                      similarities=out.similarities, boxes=out.boxes)
