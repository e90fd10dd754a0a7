"""`--resume auto`, the DVC stage's resume: a killed `umo train` continues to the LoRA of an uninterrupted run;
a run whose inputs changed starts over and says why; a finished run is only exported again.

The killed run is a real `python -m umo.cli train` process (the reward built from params: the toy world's
detector finds no face in the tiny generator's images, so L_diff moves the LoRA), SIGKILLed by its id once it
has written a checkpoint. The other tests train in this process with `FixedFaces` (tests/trainkit.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from trainkit import TRAIN, fixed_reward, kill_after_checkpoint, make_manifest, train_config, train_with

import umo.train.loop as loop
from umo.data.manifest import read_manifest, write_manifest
from umo.models.lora import LORA_FILE
from umo.train.loop import ResumeError, path_fingerprint

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6  # the killed run's: checkpoints every 2 (trainkit.TRAIN), so it dies with 2 or 4 of them done


@pytest.fixture(scope="module")
def manifest(toy_world, tmp_path_factory):
    return make_manifest(tmp_path_factory.mktemp("data"), toy_world, n_samples=4)


class CountingReward:
    """The FixedFaces reward, counting its calls (one per micro-batch trained)."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def to(self, device):
        self.inner = self.inner.to(device)
        return self

    def compute(self, images, references):
        self.calls += 1
        return self.inner.compute(images, references)


@pytest.fixture()
def run(toy_world, tiny_generator_dir, manifest, tmp_path):
    """run(out_name, *overrides, resume="auto", data=manifest) -> (TrainResult, reward calls); 2 steps unless
    overridden."""

    def _run(name: str, *overrides: str, resume: str | None = "auto", data: Path = manifest):
        reward = CountingReward(fixed_reward(toy_world))
        result = train_with(train_config(toy_world, tiny_generator_dir, "train.max_steps=2", *overrides),
                            manifest=data, out=tmp_path / name, resume=resume, reward_model=reward)
        return result, reward.calls

    return _run


def state(out: Path) -> dict:
    root = out / "checkpoints"
    return json.loads((root / (root / "latest").read_text().strip() / "train_state.json").read_text())


def max_diff(a: Path, b: Path) -> float:
    x, y = load_file(str(a)), load_file(str(b))
    assert set(x) == set(y) and x
    return max((x[k] - y[k]).abs().max().item() for k in x)


# ------------------------------------------------------------------------------------------------ killed, resumed


def test_a_killed_cli_run_resumes_to_the_lora_of_an_uninterrupted_run(toy_world, tiny_generator_dir, manifest,
                                                                       tmp_path, caplog):
    """The same `umo train --resume auto` command three times: uninterrupted (in this process, to spare a start
    of torch), then killed once a checkpoint is written, then again to the end."""
    from umo.cli import main

    overrides = [*toy_world.faces_overrides(), f"generator.path={tiny_generator_dir}", *TRAIN,
                 f"train.max_steps={STEPS}", "lora.dropout=0.1", "train.ema_decay=0.5",
                 "train.lr_scheduler=cosine", "train.warmup_steps=1"]

    def args(out: Path) -> list[str]:
        return ["train", "--params", str(ROOT / "params.yaml"), "--manifest", str(manifest), "--out", str(out),
                "--no-tracking", "--resume", "auto", *[f"-S{o}" for o in overrides]]

    cli = lambda out: [sys.executable, "-m", "umo.cli", *args(out)]
    caplog.set_level(logging.INFO, logger="umo")
    assert main(args(tmp_path / "whole")) == 0
    assert "no checkpoint in" in caplog.text and "starting from step 0" in caplog.text

    split = tmp_path / "split"
    log = tmp_path / "killed.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cli(split), stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path)
    kill_after_checkpoint(proc, split, 2, log, timeout=300)
    killed_at = state(split)["step"]
    assert 2 <= killed_at < STEPS and not (split / "lora").exists()

    resumed = subprocess.run(cli(split), capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"checkpoint-{killed_at:06d} continues this run (same inputs): resuming" in resumed.stderr
    assert f"at step {killed_at}" in resumed.stderr
    delta = max_diff(tmp_path / "whole" / "lora" / LORA_FILE, split / "lora" / LORA_FILE)
    print(f"killed at step {killed_at}; resumed vs uninterrupted LoRA: max |delta| = {delta:.3g}")
    assert delta <= 1e-6
    steps = lambda out: [h["step"] for h in json.loads((out / "history.json").read_text())]
    assert steps(split) == steps(tmp_path / "whole") == list(range(1, STEPS + 1))


# ------------------------------------------------------------------------------------------------ auto's decisions


def test_auto_on_a_finished_run_exports_it_again_without_training(run, tmp_path):
    first, calls = run("a")
    assert calls == 2 and first.step == 2
    saved = load_file(str(first.lora))
    (tmp_path / "a" / "lora" / LORA_FILE).unlink()  # DVC deletes the stage's outputs that do not persist
    again, calls = run("a")
    assert calls == 0 and again.step == 2
    assert max_diff(first.lora, again.lora) == 0 and set(load_file(str(again.lora))) == set(saved)
    # more steps on a flat LR schedule continue the run; fewer than the checkpoint's start over
    more, calls = run("a", "train.max_steps=3")
    assert calls == 1 and more.step == 3
    fewer, calls = run("a", "train.max_steps=1")
    assert calls == 1 and fewer.step == 1 and sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) \
        == ["checkpoint-000001", "latest"]


def test_auto_starts_over_when_an_input_changed_and_says_why(run, manifest, tmp_path, caplog):
    run("b")
    before = state(tmp_path / "b")["inputs"]
    assert set(before) == {"settings", "data", "generator", "reward", "code"}

    caplog.clear()
    result, calls = run("b", "train.learning_rate=0.001")
    assert calls == 2 and result.step == 2  # all over again, from step 0
    assert "settings changed; starting from step 0 (deleting the earlier run's checkpoints" in caplog.text
    after = state(tmp_path / "b")["inputs"]
    assert [k for k in before if before[k] != after[k]] == ["settings"]

    # the same data elsewhere is the same input; a changed prompt is not
    copy = tmp_path / "data-copy"
    shutil.copytree(manifest.parent, copy)
    assert run("b", "train.learning_rate=0.001", data=copy / manifest.name)[1] == 0
    man = read_manifest(copy / manifest.name)
    man.samples[0] = dataclasses.replace(man.samples[0], prompt="two people at a lake")
    write_manifest(man, copy / manifest.name)
    caplog.clear()
    assert run("b", "train.learning_rate=0.001", data=copy / manifest.name)[1] == 2
    assert "data changed; starting from step 0" in caplog.text


def test_latest_resumes_over_changed_inputs_with_a_warning_and_auto_then_starts_over(run, tmp_path, caplog,
                                                                                     monkeypatch):
    run("c", "train.max_steps=1")
    monkeypatch.setattr(loop, "code_fingerprint", lambda: "other code")  # an input other than the settings
    result, calls = run("c", resume="latest")
    assert calls == 1 and result.step == 2
    assert "trained on other inputs (code) than this run's; resuming as asked" in caplog.text
    assert state(tmp_path / "c")["inputs"] is None  # a mixed run: unknown inputs
    monkeypatch.undo()
    caplog.clear()
    result, calls = run("c")
    assert calls == 2 and "records no input fingerprint" in caplog.text and state(tmp_path / "c")["inputs"]
    # settings that may not change stay an error for "latest"; no argument into a used folder too
    with pytest.raises(ResumeError, match="lora.rank"):
        run("c", "lora.rank=8", resume="latest")
    with pytest.raises(ResumeError, match="earlier run"):
        run("c", resume=None)


def edit_states(out: Path, **changes) -> None:
    for f in (out / "checkpoints").glob("checkpoint-*/train_state.json"):
        data = {k: v for k, v in json.loads(f.read_text()).items() if k not in changes or changes[k] is not None}
        f.write_text(json.dumps(data | {k: v for k, v in changes.items() if v is not None}))


def test_auto_trains_again_over_a_checkpoint_of_an_older_umo_or_of_other_processes(run, tmp_path, caplog):
    run("d")
    edit_states(tmp_path / "d", inputs=None)  # an older umo's train_state.json has no "inputs"
    caplog.clear()
    assert run("d", "train.max_steps=3", resume="latest")[1] == 1  # "latest" still takes it, quietly
    assert "other inputs" not in caplog.text and state(tmp_path / "d")["inputs"] is None
    caplog.clear()
    assert run("d", "train.max_steps=3")[1] == 3
    assert "records no input fingerprint" in caplog.text
    edit_states(tmp_path / "d", world_size=2)  # as if trained under `accelerate launch` on 2 processes
    caplog.clear()
    assert run("d", "train.max_steps=3")[1] == 3
    assert "ran on 2 processes, this run on 1" in caplog.text


# ------------------------------------------------------------------------------------------------ the fingerprint


def test_weights_are_fingerprinted_by_sampled_bytes_without_reading_them_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "SMALL_FILE", 1024)
    weights = tmp_path / "gen" / "transformer" / "model.safetensors"
    weights.parent.mkdir(parents=True)
    header = json.dumps({"w": {"dtype": "F32", "shape": [65536], "data_offsets": [0, 262144]}}).encode()
    weights.write_bytes(len(header).to_bytes(8, "little") + header + bytes(262144))
    (tmp_path / "gen" / "config.json").write_text("{}")
    (tmp_path / "gen" / ".cache").mkdir()
    (tmp_path / "gen" / ".cache" / "download.lock").write_text("1")
    first = path_fingerprint(tmp_path / "gen")
    os.utime(weights, (1, 1))  # a checkout or a copy: other times, same bytes
    (tmp_path / "gen" / ".cache" / "download.lock").write_text("2")
    assert path_fingerprint(tmp_path / "gen") == first
    with open(weights, "r+b") as f:  # a retrained model of the same shapes
        f.seek(8 + len(header) + 131072)
        f.write(b"\x01")
    retrained = path_fingerprint(tmp_path / "gen")
    assert retrained != first
    (tmp_path / "gen" / "config.json").write_text('{"layers": 2}')
    assert path_fingerprint(tmp_path / "gen") != retrained
    assert path_fingerprint(tmp_path / "missing") == "absent"
    huge = tmp_path / "huge.safetensors"  # 64 GB, sparse: only the sampled bytes are read
    with open(huge, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(64 << 30)
    read = []  # the bytes the fingerprint reads of it: the size prefix, the header and the samples, never the rest
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def seek(self, *args):
            return self.f.seek(*args)

        def read(self, n=-1):
            data = self.f.read(n)
            read.append(len(data))
            return data

    monkeypatch.setattr(loop, "open", lambda *a, **k: Counting(real_open(*a, **k)), raising=False)
    path_fingerprint(huge)
    assert sum(read) == 8 + len(header) + loop.SAMPLES * loop.SAMPLE_BYTES  # about 1 MB of 64 GB


def test_the_dvc_stage_keeps_its_checkpoints_and_resumes_automatically():
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]
    assert stage["cmd"].endswith("--resume auto")
    assert {"artifacts/train/checkpoints": {"persist": True}} in stage["outs"]
    assert "artifacts/train/lora" in stage["outs"]  # the final LoRA is written again by every run
