"""The generator protocol: what the ReReFL trainer and the evaluator may ask of a multi-reference generator.

A rectified-flow (flow-matching) model with x_t = (1 - sigma) * x0 + sigma * noise and velocity
v = noise - x0, so that
    x0_hat(x_t, v, sigma) = x_t - sigma * v                      (docs/method.md)
    Euler step:  x_{next} = x_t + (sigma_next - sigma) * v
Every family (FLUX.2 [klein] and [dev]: `flux2`; Qwen-Image-Edit-Plus: `qwen_image`) is one module
implementing `Generator`; nothing outside umo/models knows about tokens, packing or VAEs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from umo.images import signed_to_rgb


@dataclass
class Conditioning:
    """Everything that stays constant over the sampler steps of one batch (computed once, no grad).

    prompt:         (B, L, D) text embeddings;           prompt_ids: (B, L, 4) their positions (FLUX.2), or None
    references:     (B, R, C) reference-image tokens or None;  reference_ids: (B, R, 4), or None
    latent_ids:     (B, N, k) positions of the generated image's tokens (N of them)
    height, width:  generated image size in pixels
    extra:          family-specific constants (a reference key/value cache, Qwen-Image's prompt mask and token
                    grids, ...)
    """

    prompt: torch.Tensor
    prompt_ids: torch.Tensor | None
    references: torch.Tensor | None
    reference_ids: torch.Tensor | None
    latent_ids: torch.Tensor
    height: int
    width: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.prompt.shape[0])

    @property
    def num_reference_tokens(self) -> int:
        return 0 if self.references is None else int(self.references.shape[1])


@runtime_checkable
class Generator(Protocol):
    """A multi-reference flow-matching generator (see the module docstring for the maths)."""

    family: str
    """Its family (umo.families.FAMILIES)."""
    pipe: Any
    """The diffusers pipeline whose modules it runs (its class writes and reads the family's LoRA files)."""
    transformer: nn.Module
    """The denoiser; the LoRA is attached to it."""
    dead_modules: tuple[str, ...]
    """Full names of the transformer's modules whose output never reaches the velocity: no LoRA goes there."""
    denoiser: nn.Module
    """What `velocity` calls: `transformer` itself, or the DDP/FSDP wrapper a trainer puts around it."""

    def condition(self, prompts: Sequence[str], references: Sequence[Sequence[torch.Tensor]], *,
                  height: int, width: int) -> Conditioning:
        """Encode prompts and each sample's reference images ((3, h, w) in [-1, 1]) once per batch."""
        ...

    def encode(self, images: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Target images (B, 3, H, W) in [-1, 1] -> clean latents x0 shaped as `velocity` expects (no grad)."""
        ...

    def initial_latents(self, cond: Conditioning, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pure noise x_1, shaped as `velocity` expects."""
        ...

    def sigmas(self, num_steps: int, cond: Conditioning) -> torch.Tensor:
        """The sampler's noise levels, num_steps + 1 values from 1 down to 0 (the family's own shift)."""
        ...

    def shift(self, u: torch.Tensor, num_steps: int, cond: Conditioning) -> torch.Tensor:
        """Uniform times in (0, 1) -> training noise levels with the family's timestep shift."""
        ...

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor | float, cond: Conditioning) -> torch.Tensor:
        """v(x_t, sigma | prompt, references), the same shape as latents."""
        ...

    def decode(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Latents -> images (B, 3, H, W) in [-1, 1], differentiable."""
        ...


def check_references(references: Sequence[Sequence[torch.Tensor]], scale: int) -> None:
    """Raise ValueError unless every sample of a batch has the same number and sizes of references (the data loader
    buckets by that), each (3, h, w) with h and w multiples of `scale` px (a family's pixels per token side)."""
    counts = {len(r) for r in references}
    shapes = {tuple(tuple(img.shape) for img in r) for r in references}
    if len(counts) != 1 or len(shapes) != 1:
        raise ValueError(f"references: every sample of a batch needs the same number and sizes of references "
                         f"(bucket the batch), got counts {sorted(counts)} and {len(shapes)} size layouts")
    for img in references[0]:
        if img.ndim != 3 or img.shape[0] != 3 or img.shape[1] % scale or img.shape[2] % scale:
            raise ValueError(f"reference image: expected (3, h, w) with h, w multiples of {scale}, "
                             f"got {tuple(img.shape)}")


def predict_x0(latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x0_hat = x_t - sigma * v (rectified flow).

    >>> predict_x0(torch.tensor([1.0]), torch.tensor([2.0]), 0.25)
    tensor([0.5000])
    """
    return latents - _expand(sigma, latents) * velocity


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor | float,
               sigma_next: torch.Tensor | float) -> torch.Tensor:
    """One Euler step of the flow ODE from sigma to sigma_next (< sigma).

    >>> euler_step(torch.tensor([1.0]), torch.tensor([2.0]), 0.5, 0.25)
    tensor([0.5000])
    """
    return latents + (_expand(sigma_next, latents) - _expand(sigma, latents)) * velocity


def _expand(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """A scalar stays a scalar; a (B,) tensor broadcasts over the remaining dimensions of `like`."""
    if isinstance(sigma, torch.Tensor) and sigma.ndim == 1:
        return sigma.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))
    return sigma


@torch.no_grad()
def sample(model: Generator, cond: Conditioning, num_steps: int, *, generator: torch.Generator | None = None,
           latents: torch.Tensor | None = None) -> torch.Tensor:
    """Plain Euler sampling from noise to x0 (no guidance); returns the final latents."""
    x = model.initial_latents(cond, generator) if latents is None else latents
    sig = model.sigmas(num_steps, cond)
    for i in range(num_steps):
        x = euler_step(x, model.velocity(x, sig[i], cond), sig[i], sig[i + 1])
    return x


@torch.no_grad()
def generate_images(model: Generator, prompt: str, references: Sequence[torch.Tensor], *, seeds: Sequence[int],
                    steps: int, height: int, width: int) -> list:
    """len(seeds) images of one prompt and reference set, as one batch: (H, W, 3) uint8 RGB arrays.

    Image k starts from the noise a batch of one draws with seeds[k], so an image does not depend on the batch
    it is made in (nor on the model: a base and its LoRA start from the same noise).
    """
    cond = model.condition([prompt] * len(seeds), [list(references)] * len(seeds), height=height, width=width)
    noise = torch.cat([model.initial_latents(cond, torch.Generator().manual_seed(int(s)))[:1] for s in seeds])
    pixels = model.decode(sample(model, cond, steps, latents=noise), cond).float().clamp(-1, 1)
    return list(signed_to_rgb(pixels))
