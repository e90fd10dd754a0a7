"""Generators: the protocol (`base`), one module per family (`flux2`), LoRA (`lora`), tiny test models (`tiny`)."""

from __future__ import annotations

import torch

from umo.models.base import Conditioning, Generator, euler_step, generate_images, predict_x0, sample

__all__ = ["Conditioning", "Generator", "euler_step", "generate_images", "load_generator", "predict_x0", "sample"]


def load_generator(config, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Generator:
    """Load the generator a `umo.config.GeneratorConfig` names (family, local path, text layers ...)."""
    if config.family == "flux2_klein":
        from umo.models.flux2 import Flux2KleinGenerator

        return Flux2KleinGenerator.from_pretrained(
            config.path, text_layers=config.text_layers, max_sequence_length=config.max_sequence_length,
            guidance_scale=config.guidance_scale, reference_cache=config.reference_cache, dtype=dtype, device=device)
    raise ValueError(f"unknown generator family {config.family!r} (known: flux2_klein)")
