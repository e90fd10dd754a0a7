"""The generator families umo fine-tunes, and which one a local diffusers folder holds (read from its
model_index.json, without loading anything: registration and the gate ask too)."""

from __future__ import annotations

import json
from pathlib import Path

# The supported families: each one's diffusers pipeline classes (model_index.json's `_class_name`)
FAMILIES = {
    "flux2_klein": ("Flux2KleinPipeline", "Flux2KleinKVPipeline"),  # FLUX.2 [klein] 4B / 9B, base and KV
    "flux2_dev": ("Flux2Pipeline",),  # FLUX.2 [dev] (32B, Mistral Small 3.1 text encoder)
    "qwen_image_edit": ("QwenImageEditPlusPipeline",),  # Qwen-Image-Edit-2509 and -2511
}


def folder_family(path: str | Path) -> str:
    """The family of a local diffusers folder, from its model_index.json. Raises FileNotFoundError naming the folder
    without one, and ValueError naming the pipeline class and the supported families for any other folder."""
    path = Path(path).expanduser()
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"generator folder {path}: no model_index.json (a diffusers pipeline folder of one "
                                f"of: {_supported()}); weights are never downloaded, put them there")
    try:
        name = json.loads(index_file.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{index_file}: not a diffusers model_index.json ({e})") from e
    for family, classes in FAMILIES.items():
        if name in classes:
            return family
    raise ValueError(f"generator folder {path}: model_index.json names {name!r}, which umo cannot fine-tune; "
                     f"supported: {_supported()}")


def _supported() -> str:
    return "; ".join(f"{family} ({', '.join(classes)})" for family, classes in FAMILIES.items())


def family_slug(family: str) -> str:
    """How a family appears in names: `qwen_image_edit` -> `qwen-image-edit`.

    >>> family_slug("flux2_klein")
    'flux2-klein'
    """
    return family.replace("_", "-")
