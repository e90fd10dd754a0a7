"""What a shipped LoRA package says about generating with it, readable without torch: registration, the gate
and deployment name these files and settings, and `umo.serve` (which loads the models) reads them.

A package is the LoRA (`pytorch_lora_weights.safetensors`) beside `config.json`, whose `serving` section is a
`ServeSettings`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from umo.config import DetectorConfig, GeneratorConfig
from umo.typed import from_dict, to_dict

SETTINGS_FILE = "config.json"
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default weight name


class GenerationError(ValueError):
    """Input that generation cannot use; the message names the reference (or the row) and the problem."""


@dataclass
class ServeSettings:
    """How a LoRA generates: what registration writes into the package's config.json (`serving`)."""

    generator: GeneratorConfig
    steps: int
    """Sampling steps (the evaluation's)."""
    max_references: int
    """The most references per image: the most people the model was trained with (prepare.max_identities)."""
    detector: DetectorConfig | None = None
    """Each reference must show a face to this detector; null = references are not checked."""
    min_face_size: float = 0.0
    providers: Literal["auto"] | list[str] = "auto"
    """The detector's onnxruntime execution providers (faces.providers: auto = CUDA where there is one)."""

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @staticmethod
    def read(path: str | Path) -> ServeSettings:
        """The `serving` section of a package's config.json (a clear error naming the file otherwise)."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())["serving"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise GenerationError(f"{path}: not a umo package's config.json (no `serving` section: {err!r}); "
                                  "register the LoRA again with this umo") from err
        return from_dict(ServeSettings, raw, source=str(path))


def serve_settings(config) -> ServeSettings:
    """ServeSettings from a loaded params file (umo.config.Sections), with the generator folder and the detector
    root made absolute (a package is read from another working folder)."""
    gen = dataclasses.replace(config.generator, path=str(Path(config.generator.path).expanduser().resolve()))
    det = dataclasses.replace(config.faces.detector, root=str(Path(config.faces.detector.root).expanduser().resolve()))
    return ServeSettings(gen, config.eval.steps, config.prepare.max_identities, det, config.faces.min_face_size,
                         config.faces.providers)


def lora_file(path: str | Path) -> Path:
    """A LoRA file, or a folder holding one (a training run's `lora/`, a checkpoint): the file's path."""
    path = Path(path)
    if path.is_dir():
        path = path / LORA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no LoRA file (expected {LORA_FILE} written by `umo train`)")
    return path
