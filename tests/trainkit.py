"""Helpers shared by the training tests and the script they launch with torchrun.

The tiny random generator cannot draw faces, so the reward's detector is `FixedFaces` (two faces at known
places of every generated image); everything after detection is the real reward. The references are toy-world
portraits of held-out identities, embedded once by the toy world's real detector and reward embedder, as data
prep does.

    python tests/trainkit.py TOY_WORLD GENERATOR MANIFEST OUT [key=value ...] [resume=auto|latest]
                                                                    # one training process
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from umo.config import Config, load_config
from umo.data.manifest import Manifest, Reference, Sample, write_manifest
from umo.faces.embed import load_arcface
from umo.io import sha256_file
from umo.reward import MatchingReward
from umo.toy.tiny.faces import FixedFaces
from umo.toy.world.identity import make_identity
from umo.toy.world.render import render_portrait
from umo.train.loop import train

SIZE = 64
CENTERS, FACE = [(16, 32), (48, 32)], 24
TRAIN = ["generator.resolution=[64, 64]", "generator.reference_resolution=[32, 32]", "lora.rank=4",
         "lora.alpha=4", "train.sampler_steps=4", "train.grad_step_range=[1, 2]", "train.learning_rate=0.003",
         "train.warmup_steps=0", "train.checkpoint_every=2", "train.checkpoints_total_limit=2",
         "train.sample_every=2", "train.max_steps=4", "train.batch_size=1", "generator.max_sequence_length=512"]


def train_config(toy_world, generator_dir, *overrides: str) -> Config:
    return load_config(None, [*toy_world.faces_overrides(), f"generator.path={generator_dir}", *TRAIN, *overrides])


def train_with(config: Config, **kw):
    """umo.train.loop.train with the sections of one params file (no MLflow unless tracking= says where)."""
    return train(config.train, generator=config.generator, lora=config.lora, reward=config.reward,
                 faces=config.faces, seed=config.seed, **kw)


def fixed_reward(toy_world) -> MatchingReward:
    return MatchingReward(FixedFaces(CENTERS, FACE), load_arcface(toy_world.reward_path, toy_world.config.reward.arch))


def make_manifest(root: Path, toy_world, n_samples: int = 4) -> Path:
    """n_samples samples of 2 held-out identities each: portraits as references, the pair as the target."""
    from PIL import Image

    cfg = load_config(None, toy_world.faces_overrides())
    embedder = MatchingReward.from_config(cfg.faces, cfg.reward)
    rng = np.random.default_rng(0)
    first = toy_world.config.n_train_identities
    samples, embeddings = [], {}
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "targets").mkdir(exist_ok=True)
    for i in range(n_samples):
        ids = [first + 2 * i, first + 2 * i + 1]
        portraits = [render_portrait(make_identity(toy_world.config.world_seed, k), rng, (128, 128)).image
                     for k in ids]
        refs = []
        for k, image in zip(ids, portraits):
            Image.fromarray(image).save(root / "refs" / f"id{k}.png")
            refs.append(Reference(f"toy/{k}", f"refs/id{k}.png"))
        Image.fromarray(np.concatenate(portraits, axis=1)).resize((SIZE, SIZE)).save(root / "targets" / f"s{i}.png")
        samples.append(Sample(f"s{i}", f"g{i}", "two people side by side", f"targets/s{i}.png", tuple(refs)))
        tensor = torch.from_numpy(np.stack(portraits)).permute(0, 3, 1, 2).float() / 127.5 - 1
        embeddings[f"s{i}"] = torch.cat(embedder.embed_references(tensor, largest_only=True))
    manifest = Manifest("train", samples, toy_world=True, embedder={"path": str(toy_world.reward_path),
                                                                             "sha256": sha256_file(toy_world.reward_path)})
    return write_manifest(manifest, root / "train.json", embeddings)


def kill_after_checkpoint(proc: subprocess.Popen, out: Path, step: int, log: Path, timeout: float) -> None:
    """Wait until the run writing to `out` points `latest` at a checkpoint of `step` or later, then SIGKILL it and
    every process it started (no handler runs, as when a host dies). Fails if the run ended before the kill."""
    import psutil  # why here: only the tests that kill a run need it, not the launched training script

    pointer, deadline = out / "checkpoints" / "latest", time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if pointer.is_file() and int(pointer.read_text().strip().split("-")[1]) >= step:
                break
            time.sleep(0.02)
    finally:
        try:
            parent = psutil.Process(proc.pid)
            for p in [parent, *parent.children(recursive=True)]:
                p.kill()
        except psutil.NoSuchProcess:
            pass
        proc.wait(30)
    assert proc.returncode == -9, f"it ended ({proc.returncode}) before the kill: {log.read_text()[-3000:]}"


def main(argv: list[str]) -> None:
    """One process of a distributed test run; writes its own LoRA tensors to OUT/rank<r>.safetensors (a sharded
    run: the whole LoRA, gathered, from rank 0). An argument resume=auto|latest is `train`'s resume."""
    from accelerate import PartialState

    from umo.io import save_safetensors
    from umo.models.lora import lora_state_dict
    from umo.toy.world.build import load_toyworld
    from umo.train.sharded import gathered_lora, is_sharded

    world_dir, generator_dir, manifest, out, *rest = argv
    resume = next((a.split("=", 1)[1] for a in rest if a.startswith("resume=")), None)
    overrides = [a for a in rest if not a.startswith("resume=")]
    world = load_toyworld(Path(world_dir))
    result = train_with(train_config(world, generator_dir, *overrides), manifest=manifest, out=out, resume=resume,
                        reward_model=fixed_reward(world))
    state = PartialState()
    state.wait_for_everyone()
    if is_sharded(result.transformer):
        whole = gathered_lora(result.transformer)  # every process takes part; rank 0 receives it
        if state.is_main_process:
            save_safetensors(whole, Path(out) / "rank0.safetensors")
    else:
        save_safetensors(lora_state_dict(result.transformer), Path(out) / f"rank{state.process_index}.safetensors")
    state.wait_for_everyone()
    state.destroy_process_group()


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(sys.argv[1:])
