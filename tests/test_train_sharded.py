"""FSDP2: the LoRA trained on a sharded transformer by 2 CPU processes (gloo) under `accelerate launch` with
infra/accelerate/fsdp_8gpu.yaml (made to fit the CPU: 2 processes, fp32). A killed sharded run resumes to the LoRA
of an uninterrupted one; its checkpoints hold the LoRA's and AdamW's shards, never the base; a sharded
checkpoint converts to the LoRA file the run exports, byte for byte.

accelerate runs FSDP on accelerators only; on the CPU umo shards with the same plugin settings
(umo.train.loop.shard_on_cpu), so this is accelerate's own FSDP2 preparation, on gloo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from servers import free_port
from trainkit import kill_after_checkpoint, make_manifest

from umo.models.lora import LORA_FILE

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6  # checkpoints every 2 (trainkit.TRAIN): the killed run dies with 2 or 4 of them done
SETTINGS = (f"train.max_steps={STEPS}", "train.gradient_accumulation_steps=2", "lora.dropout=0.1",
            "train.ema_decay=0.5", "train.lr_scheduler=cosine", "train.warmup_steps=1")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def launch(toy_world, tiny_generator_dir, tmp_path_factory):
    """launch(out, *args) -> Popen of `accelerate launch` (2 CPU processes, FSDP2) of tests/trainkit.py."""
    root = tmp_path_factory.mktemp("sharded")
    manifest = make_manifest(root / "data", toy_world, n_samples=4)
    config = yaml.safe_load((ROOT / "infra/accelerate/fsdp_8gpu.yaml").read_text())
    config |= {"num_processes": 2, "use_cpu": True, "mixed_precision": "no", "main_process_port": free_port()}
    config.pop("gpu_ids")
    (root / "fsdp_cpu.yaml").write_text(yaml.safe_dump(config))
    env = os.environ | {"PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1"}

    def _launch(out: Path, *args: str, log: Path) -> subprocess.Popen:
        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(root / "fsdp_cpu.yaml"),
               str(ROOT / "tests" / "trainkit.py"), str(toy_world.root), str(tiny_generator_dir), str(manifest),
               str(out), *SETTINGS, *args]
        with open(log, "wb") as f:
            return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=root,
                                    start_new_session=True)

    return _launch


def finish(proc: subprocess.Popen, log: Path) -> str:
    assert proc.wait(600) == 0, log.read_text()[-5000:]
    return log.read_text()


def latest(out: Path) -> Path:
    root = out / "checkpoints"
    return root / (root / "latest").read_text().strip()


def test_a_killed_sharded_run_resumes_to_the_lora_of_an_uninterrupted_run(launch, tmp_path):
    whole = tmp_path / "whole"
    text = finish(launch(whole, "resume=auto", log=tmp_path / "whole.log"), tmp_path / "whole.log")
    assert "FSDP2 on the CPU (gloo): 2 processes" in text

    split = tmp_path / "split"
    proc = launch(split, "resume=auto", log=tmp_path / "killed.log")
    kill_after_checkpoint(proc, split, 2, tmp_path / "killed.log", timeout=600)
    killed_at = json.loads((latest(split) / "train_state.json").read_text())["step"]
    assert 2 <= killed_at < STEPS and not (split / "lora").exists()

    text = finish(launch(split, "resume=auto", log=tmp_path / "resumed.log"), tmp_path / "resumed.log")
    assert f"at step {killed_at}" in text
    a, b = load_file(str(whole / "lora" / LORA_FILE)), load_file(str(split / "lora" / LORA_FILE))  # the EMA's
    assert set(a) == set(b) and len(a) == 2 * 20
    delta = max((a[k] - b[k]).abs().max().item() for k in a)
    live_a, live_b = load_file(str(whole / "rank0.safetensors")), load_file(str(split / "rank0.safetensors"))
    live = max((live_a[k] - live_b[k]).abs().max().item() for k in live_a)
    print(f"killed at step {killed_at}; resumed vs uninterrupted: EMA max |delta| {delta:.3g}, live {live:.3g}")
    assert delta <= 1e-6 and live <= 1e-6
    assert any(v.abs().max() > 0 for k, v in live_b.items() if ".lora_B." in k)  # B moved off its zero init
    steps = lambda out: [h["step"] for h in json.loads((out / "history.json").read_text())]
    assert steps(split) == steps(whole) == list(range(1, STEPS + 1))

    # the checkpoint: shards of the LoRA and of AdamW's state from each process, never a frozen weight
    from torch.distributed.checkpoint import FileSystemReader

    checkpoint = latest(whole)
    assert sorted(p.name for p in checkpoint.iterdir()) == ["history.json", "rng-0.safetensors", "rng-1.safetensors",
                                                            "sharded.json", "state", "train_state.json"]
    assert sorted(p.name for p in (checkpoint / "state").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    keys = FileSystemReader(str(checkpoint / "state")).read_metadata().state_dict_metadata
    assert {k.split(".", 1)[0] for k in keys} == {"model", "optimizer", "ema"}
    assert all(".lora_A." in k or ".lora_B." in k for k in keys), [k for k in keys if "lora_" not in k][:3]
    assert sum(k.startswith("model.") for k in keys) == 2 * 20

    # conversion: the final checkpoint's EMA is the exported LoRA file, byte for byte; its live LoRA, rank 0's
    from umo.cli import main
    from umo.train.sharded import read_sharded_lora

    assert main(["convert-checkpoint", str(whole), "--ema", "--out", str(tmp_path / "converted")]) == 0
    assert (tmp_path / "converted" / LORA_FILE).read_bytes() == (whole / "lora" / LORA_FILE).read_bytes()
    read = read_sharded_lora(checkpoint)
    assert set(read) == set(live_a) and all((read[k] == live_a[k]).all() for k in read)


def test_conversion_refuses_what_is_not_a_sharded_checkpoint(tmp_path, caplog):
    from umo.cli import main

    (tmp_path / "checkpoint-000002").mkdir()
    assert main(["convert-checkpoint", str(tmp_path / "checkpoint-000002"), "--out", str(tmp_path / "o")]) == 2
    assert "sharded.json: not a readable sharded checkpoint description" in caplog.text
    (tmp_path / "checkpoint-000002" / "sharded.json").write_text('{"format": "umo-fsdp2-lora/1"}')
    assert main(["convert-checkpoint", str(tmp_path / "checkpoint-000002"), "--out", str(tmp_path / "o")]) == 2
    assert "sharded.json: missing world_size, pipeline, adapter, param_groups, scheduler" in caplog.text
    assert not (tmp_path / "o").exists()
