"""Helpers shared by the evaluation tests and the script they launch with torchrun.

The tiny random generator cannot draw faces, so the judge's detector reports trainkit's two fixed faces on
generated images (64 x 64) and runs the toy world's real detector on everything else (the references);
everything after detection is the real judge. The candidate (and champion) LoRAs are random, non-zero
adapters written by the real `save_lora`, so each model paints different pixels.

    python tests/evalkit.py TOY_WORLD GENERATOR MANIFEST LORA OUT [key=value ...]   # one evaluation process
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from trainkit import CENTERS, FACE, SIZE, train_config

from umo.config import Config
from umo.eval.score import Judge
from umo.toy.tiny.faces import FixedFaces

EVAL = ["eval.benchmark=heldout", "eval.images_per_item=2", "eval.steps=3", "eval.report_items=1"]


def eval_config(toy_world, generator_dir, manifest, *overrides: str) -> Config:
    return train_config(toy_world, generator_dir, f"eval.path={manifest}", *EVAL, *overrides)


class GeneratedFaces:
    """The real detector on references; trainkit's fixed faces on generated images."""

    def __init__(self, real) -> None:
        self.real, self.fixed = real, FixedFaces(CENTERS, FACE)

    def detect(self, images):
        if images[0].shape[:2] == (SIZE, SIZE):
            return self.fixed.detect_tensor(torch.zeros(len(images)))
        return self.real.detect(images)


def fixed_judges(config: Config) -> dict[str, Judge]:
    """Every judge of the config, each over the shared GeneratedFaces detector."""
    from umo.faces.detect import FaceDetector
    from umo.faces.embed import OnnxRecognizer

    detector = GeneratedFaces(FaceDetector.from_config(config.faces.detector))
    return {j.label: Judge(detector, OnnxRecognizer.from_model_root(j.root, j.pack)) for j in config.faces.judges}


def random_lora(config: Config, out: Path, seed: int, scale: float = 0.3) -> Path:
    """A LoRA file with random A and B (B is zero at init, so a fresh adapter would change nothing)."""
    from umo.models import load_generator
    from umo.models.lora import add_lora, lora_parameters, save_lora

    model = load_generator(config.generator)
    add_lora(model.transformer, rank=config.lora.rank, alpha=config.lora.alpha,
             target_modules=config.lora.target_modules, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model.transformer):
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return save_lora(model.transformer, out)


def main(argv: list[str]) -> None:
    """One process of a distributed evaluation test."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from umo.eval.run import evaluate
    from umo.toy.world.build import load_toyworld

    world_dir, generator_dir, manifest, lora, out, *overrides = argv
    config = eval_config(load_toyworld(Path(world_dir)), generator_dir, manifest, *overrides)
    evaluate(config.eval, generator=config.generator, faces=config.faces, lora=lora, judges=fixed_judges(config),
             out=out)


if __name__ == "__main__":
    main(sys.argv[1:])
