"""Generators: the protocol (`base`), one module per family (`flux2`: FLUX.2 [klein] and [dev]; `qwen_image`:
Qwen-Image-Edit-Plus), LoRA (`lora`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from umo.families import FAMILIES, folder_family
from umo.models.base import Conditioning, Generator, euler_step, generate_images, predict_x0, sample

__all__ = ["FAMILIES", "Conditioning", "Generator", "TRAINED_WITH", "check_trained_with", "euler_step", "folder_family",
           "generate_images", "load_generator", "predict_x0", "sample"]

# Optional, beside model_index.json: the conditioning a generator was trained with. A model trained on 32-px
# references and 4 prompt tokens still runs on 48-px references or 512 tokens, only worse (the toy base: ID-Sim
# 24 instead of 29), so a recorded setting that the config contradicts is an error, never a silent degradation.
TRAINED_WITH = "umo_trained_with.json"
CHECKED = ("resolution", "reference_resolution", "max_sequence_length")


def check_trained_with(config) -> None:
    """Raise ValueError, naming the file and each setting, where `config` (a GeneratorConfig) contradicts the
    generator folder's TRAINED_WITH record; a folder without one (real weights) is not checked."""
    path = Path(config.path).expanduser() / TRAINED_WITH
    if not path.is_file():
        return
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object of settings, got {type(record).__name__}")
    wrong = [f"generator.{k} is {getattr(config, k)!r}, trained with {record[k]!r}" for k in CHECKED
             if k in record and _plain(record[k]) != _plain(getattr(config, k))]
    if wrong:
        raise ValueError(f"{path}: {'; '.join(wrong)}: set the generator settings to what the model was trained "
                         "with (a mismatch runs, but degrades identity)")


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def load_generator(config, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Generator:
    """Load the generator a `umo.config.GeneratorConfig` names: its folder's family (`generator.family`: auto,
    or the family the folder must be), text layers, guidance ..."""
    family = folder_family(config.path)
    if config.family not in ("auto", family):
        raise ValueError(f"generator folder {config.path} holds a {family} model, but generator.family is "
                         f"{config.family!r}: set generator.family to {family!r} (or auto)")
    check_trained_with(config)
    if family == "qwen_image_edit":
        # lazy: a family's module (and its diffusers and transformers classes) load on use
        from umo.models.qwen_image import QwenImageEditGenerator

        return QwenImageEditGenerator.from_pretrained(config.path, guidance_scale=config.guidance_scale, dtype=dtype,
                                                      device=device)
    # lazy: as above
    from umo.models.flux2 import Flux2DevGenerator, Flux2KleinGenerator

    cls = Flux2DevGenerator if family == "flux2_dev" else Flux2KleinGenerator
    return cls.from_pretrained(config.path, text_layers=config.text_layers,
                               max_sequence_length=config.max_sequence_length, guidance_scale=config.guidance_scale,
                               reference_cache=config.reference_cache, dtype=dtype, device=device)
