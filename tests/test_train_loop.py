"""The accelerate training loop on the tiny generator (`tests/trainkit.py` says how faces get detected)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from browser import dump_dom_showing
import torch
from safetensors.torch import load_file
from servers import free_port
from trainkit import fixed_reward, make_manifest, train_config, train_with

from umo.data.manifest import ManifestError, read_manifest
from umo.models.flux2 import Flux2KleinGenerator
from umo.models.lora import LORA_FILE, add_lora, load_lora, lora_state_dict
from umo.train.data import TrainData, epoch_batches, shard
from umo.train.loop import NonFiniteLossError, ResumeError
from umo.train.rerefl import rerefl_step

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def manifest(toy_world, tmp_path_factory):
    return make_manifest(tmp_path_factory.mktemp("data"), toy_world, n_samples=4)


@pytest.fixture()
def run(toy_world, tiny_generator_dir, manifest, tmp_path):
    """run(out_name, *overrides, resume=None, reward=None) -> TrainResult."""

    def _run(name: str, *overrides: str, resume: str | None = None, reward=None, tracking: bool = False):
        cfg = train_config(toy_world, tiny_generator_dir, *overrides)
        return train_with(cfg, manifest=manifest, out=tmp_path / name, resume=resume,
                          reward_model=reward or fixed_reward(toy_world), tracking=cfg.tracking if tracking else None)

    return _run


def gen_targets() -> list[str]:
    from umo.config import LoraConfig

    return LoraConfig().target_modules


# ------------------------------------------------------------------------------------------------ data order


def test_epoch_order_is_bucketed_deterministic_and_sharded_without_overlap():
    counts = [1, 2, 2, 3, 1, 2, 1, 2, 2, 3]
    a = epoch_batches(counts, batch_size=2, seed=5, epoch=0)
    assert a == epoch_batches(counts, batch_size=2, seed=5, epoch=0)
    assert a != epoch_batches(counts, batch_size=2, seed=5, epoch=1)
    assert all(len({counts[i] for i in b}) == 1 and len(b) == 2 for b in a)  # one reference layout per batch
    # 1 ref: 3 samples -> 1 batch; 2 refs: 5 -> 2; 3 refs: 2 -> 1
    assert len(a) == 4
    ranks = [shard(a, r, 3) for r in range(3)]
    assert [len(s) for s in ranks] == [1, 1, 1]  # truncated to a multiple of 3: the same steps everywhere
    seen = [i for s in ranks for b in s for i in b]
    assert len(seen) == len(set(seen))


def test_train_data_reads_the_manifest(manifest, tmp_path):
    import shutil

    from umo.data.manifest import load_embeddings

    shutil.copytree(manifest.parent, tmp_path / "copy")
    man = read_manifest(tmp_path / "copy" / manifest.name)
    data = TrainData(man, load_embeddings(man), resolution=[64, 64], reference_resolution=[32, 32])
    batch = data.batch([0, 1])
    assert batch.targets.shape == (2, 3, 64, 64) and batch.targets.min() >= -1 and batch.targets.max() <= 1
    assert [r.shape for r in batch.references[0]] == [(3, 32, 32)] * 2
    assert batch.reference_embeddings[0].shape[0] == 2
    (man.root / man.samples[0].target).write_bytes(b"not a png")
    with pytest.raises(ManifestError, match="s0.png: cannot read"):
        data.batch([0])


# ------------------------------------------------------------------------------------------------ training


def test_training_moves_every_lora_parameter_keeps_the_base_and_saves_only_the_lora(run, tiny_generator_dir):
    result = run("a", "train.batch_size=2", "train.gradient_accumulation_steps=2", "train.max_steps=3")
    assert result.step == 3 and result.summary["skipped_nonfinite"] == 0
    assert result.summary["final_faces_per_sample"] == 2.0

    base = Flux2KleinGenerator.from_pretrained(tiny_generator_dir).transformer.state_dict()
    trained = result.transformer
    for key, value in trained.state_dict().items():
        if "lora_" not in key:  # peft names the wrapped Linear's weight base_layer.weight
            assert torch.equal(value, base[key.replace(".base_layer", "")]), key
    ref = Flux2KleinGenerator.from_pretrained(tiny_generator_dir)
    add_lora(ref.transformer, rank=4, alpha=4.0, target_modules=gen_targets(), seed=0)
    start = lora_state_dict(ref.transformer)
    now = lora_state_dict(trained)
    assert set(start) == set(now) and len(now) == 2 * 20  # A and B of 20 adapted layers
    for key in now:
        assert not torch.equal(now[key], start[key]), f"{key} did not change"

    out = result.lora.parents[1]
    checkpoint = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert checkpoint.name == "checkpoint-000003"
    assert sorted(p.name for p in checkpoint.iterdir()) == sorted(
        [LORA_FILE, "history.json", "optimizer.bin", "random_states_0.pkl", "scheduler.bin", "train_state.json"])
    for f in (checkpoint / LORA_FILE, result.lora):
        tensors = load_file(str(f))
        assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors), f
    saved = {k.removeprefix("transformer."): v for k, v in load_file(str(result.lora)).items()}
    assert all(torch.equal(saved[k], now[k]) for k in now)
    load_lora(ref.transformer, result.lora)  # our own reader takes it back exactly
    assert all(torch.equal(v, now[k]) for k, v in lora_state_dict(ref.transformer).items())
    # pruning: checkpoint_every 2 and the last -> 2 and 3 kept (limit 2)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-000002", "checkpoint-000003",
                                                                       "latest"]


def test_reward_on_fixed_draws_rises_through_the_loop(run, tiny_generator_dir, toy_world, manifest, monkeypatch):
    """The tiny random generator learns nothing that carries across noise draws in a few dozen steps, so the
    draws are held fixed (every step seeds its generator with SEED): the loop then does gradient ascent on
    exactly the reward evaluated here, and that reward must rise."""
    import umo.train.loop
    from umo.data.manifest import load_embeddings

    seed = 11
    monkeypatch.setattr(umo.train.loop, "draw_seed", lambda *args: seed)
    result = run("r", "train.diff_weight=0", "train.max_steps=24", "train.checkpoint_every=100",
                 "train.grad_step_range=[2, 2]")
    man = read_manifest(manifest)
    data = TrainData(man, load_embeddings(man), resolution=[64, 64], reference_resolution=[32, 32])
    reward = fixed_reward(toy_world)

    def score(gen) -> float:  # each sample alone, with the draws its training steps used
        with torch.no_grad():
            return sum(float(rerefl_step(gen, reward, data.batch([i]), sampler_steps=4, grad_step_range=[2, 2],
                                         diff_weight=0.0, height=64, width=64,
                                         generator=torch.Generator().manual_seed(seed)).reward)
                       for i in range(len(data))) / len(data)

    gen = Flux2KleinGenerator.from_pretrained(tiny_generator_dir)
    add_lora(gen.transformer, rank=4, alpha=4.0, target_modules=gen_targets(), seed=0)
    before = score(gen)
    load_lora(gen.transformer, result.lora)
    after = score(gen)
    assert after > before + 0.02, (before, after)  # measured: 0.045 -> 0.083


class FlakyReward:
    """The real reward, except that the calls numbered in `bad` return NaN and those in `crash` raise."""

    def __init__(self, inner, bad=(), crash=()) -> None:
        self.inner, self.bad, self.crash, self.calls = inner, set(bad), set(crash), 0

    def to(self, device):
        self.inner = self.inner.to(device)
        return self

    def compute(self, images, references):
        out = self.inner.compute(images, references)
        self.calls += 1
        if self.calls in self.crash:
            raise RuntimeError("simulated crash")
        if self.calls in self.bad:
            out = dataclasses.replace(out, rewards=out.rewards * math.nan)
        return out


def test_a_crashed_run_resumes_to_the_lora_of_an_uninterrupted_run(run, toy_world, tmp_path):
    settings = ("train.gradient_accumulation_steps=2", "lora.dropout=0.1", "train.ema_decay=0.5",
                "train.lr_scheduler=cosine", "train.warmup_steps=1")
    whole = run("whole", "train.max_steps=4", *settings)
    # the same run crashes in step 3 (2 micro-batches a step: the 5th reward call), after the checkpoint of step 2
    with pytest.raises(RuntimeError, match="simulated crash"):
        run("split", "train.max_steps=4", *settings, reward=FlakyReward(fixed_reward(toy_world), crash={5}))
    assert (tmp_path / "split" / "checkpoints" / "latest").read_text().strip() == "checkpoint-000002"
    resumed = run("split", "train.max_steps=4", *settings, resume="latest")
    assert resumed.step == 4
    a, b = load_file(str(whole.lora)), load_file(str(resumed.lora))  # the EMA's weights
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    live_a, live_b = lora_state_dict(whole.transformer), lora_state_dict(resumed.transformer)
    assert max((live_a[k] - live_b[k]).abs().max().item() for k in live_a) <= 1e-6
    assert any(not torch.equal(a[k], b[k].new_zeros(b[k].shape)) for k in a)
    # the crashed run wrote no history.json; the resumed one has every step once, as the uninterrupted one
    steps = lambda name: [h["step"] for h in json.loads((tmp_path / name / "history.json").read_text())]
    assert steps("split") == steps("whole") == [1, 2, 3, 4]


def test_gradient_checkpointing_trains_the_same_lora(run):
    plain = run("plain", "train.max_steps=2")
    recomputed = run("ckpt", "train.max_steps=2", "train.gradient_checkpointing=true")
    assert recomputed.transformer.is_gradient_checkpointing
    a, b = lora_state_dict(plain.transformer), lora_state_dict(recomputed.transformer)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_the_anchor_term_holds_the_lora_near_the_frozen_base(run, tmp_path):
    """anchor_weight beta adds beta * MSE(v_LoRA, v_base) at the gradient step. At step 1 the fresh LoRA (B = 0)
    IS the base: the anchor is exactly 0. Afterwards it measures how far the LoRA's velocity has moved, and with
    the same draws a heavy anchor keeps it nearer than a negligible one; off (0), it is not computed at all."""
    def anchors(name: str, weight: float) -> list[float]:
        run(name, "train.max_steps=4", f"train.anchor_weight={weight}")
        return [h["anchor_loss"] for h in json.loads((tmp_path / name / "history.json").read_text())]

    off, light, heavy = anchors("off", 0.0), anchors("light", 1e-9), anchors("heavy", 1000.0)
    assert off == [0.0] * 4
    assert light[0] == heavy[0] == 0.0 and all(v > 0 for v in light[1:] + heavy[1:])
    assert heavy[2] < light[2] and heavy[3] < light[3], (light, heavy)


def test_a_run_refuses_to_mix_with_another_and_resume_checks_settings(run):
    run("x", "train.max_steps=2")
    with pytest.raises(ResumeError, match="earlier run"):
        run("x", "train.max_steps=2")
    with pytest.raises(ResumeError, match="lora.rank"):
        run("x", "train.max_steps=4", "lora.rank=8", resume="latest")
    assert run("x", "train.max_steps=3", resume="latest").step == 3  # more steps may be added
    with pytest.raises(ResumeError, match="not a complete checkpoint"):
        run("y", resume="/nonexistent/checkpoint-000001")


def test_non_finite_loss_skips_the_step_and_too_many_abort(run, toy_world):
    result = run("n", "train.max_steps=4", reward=FlakyReward(fixed_reward(toy_world), bad={2}))
    assert result.step == 4 and result.summary["skipped_nonfinite"] == 1
    assert all(torch.isfinite(v).all() for v in lora_state_dict(result.transformer).values())
    with pytest.raises(NonFiniteLossError, match="non-finite for 2 steps in a row"):
        run("m", "train.max_steps=6", "train.max_nonfinite_steps=2",
            reward=FlakyReward(fixed_reward(toy_world), bad={3, 4}))


def test_training_logs_to_a_real_mlflow_server(run, mlflow_server, monkeypatch, toy_world, tmp_path):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "sentinel-secret-6f2a")
    result = run("t", f"tracking.tracking_uri={mlflow_server}", "tracking.experiment=train-test",
                 "train.judge_every=2", "tracking.system_metrics_seconds=0.2", tracking=True)
    client = MlflowClient(mlflow_server)
    full = client.get_run(result.run_id)
    data = full.data
    assert data.params["train.learning_rate"] == "0.003" and data.params["data.samples"] == "4"
    # only what training reads: its sections, the face models of the reward, the data and the processes
    assert {k.split(".")[0] for k in data.params} == {"seed", "generator", "lora", "reward", "train", "faces",
                                                      "data", "dist"}, sorted(data.params)
    assert not any(k.startswith(("faces.judges", "eval.", "registry.", "deploy.", "toy")) for k in data.params)
    # the manifest as the training dataset, its digest DVC's md5 of the file
    (inp,) = full.inputs.dataset_inputs
    manifest = Path(data.params["data.manifest"])
    assert (inp.dataset.name, inp.dataset.digest) == ("train", hashlib.md5(manifest.read_bytes()).hexdigest())
    assert json.loads(inp.dataset.profile) == {"items": 4} and inp.tags[0].value == "training"
    # MLflow's system metrics, sampled while it trained
    assert data.metrics["system/cpu_utilization_percentage"] >= 0 and data.metrics["system/system_memory_usage_megabytes"] > 0
    # where it came from: the checkout's commit
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert (data.tags["mlflow.source.git.commit"], data.tags["mlflow.source.name"]) == (head, "umo train")
    for key in ("loss", "diff_loss", "reward", "reward_matched", "reward_unmatched", "faces_per_sample", "lr",
                "grad_norm", "skipped_nonfinite"):
        assert [m.step for m in client.get_metric_history(result.run_id, key)] == [1, 2, 3, 4], key
    assert data.metrics["faces_per_sample"] == 2.0
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"images", "train_metrics.json"} <= artifacts
    # MLflow's image series, keyed with the step (the UI's slider): the grid and each sample's matching picture
    names = [a.path.split("/")[-1] for a in client.list_artifacts(result.run_id, "images")]
    logged = sorted({(n.split("+")[0], int(n.split("+")[2])) for n in names if n.endswith(".png")})
    assert logged == [("matching~0", 2), ("matching~0", 4), ("samples~grid", 2), ("samples~grid", 4)]
    # ... and the run's page in the MLflow UI (a real headless Chromium) draws them with a slider over the steps
    experiment = client.get_run(result.run_id).info.experiment_id
    dump_dom_showing(f"{mlflow_server}/#/experiments/{experiment}/runs/{result.run_id}/model-metrics",
                     tmp_path / "profile", ["matching/0", "samples/grid",
                                            'role="slider" aria-label="Slider thumb" aria-valuemin="2" aria-valuemax="4"'],
                     height=3000)
    # the judge's check of the reward on the same draws: the judge's detector finds no face in the tiny
    # generator's images (the reward's fixed detector "finds" two), so the gap is the reward's whole ID-Sim
    guard = {k: client.get_metric_history(result.run_id, f"guard/{k}") for k in
             ("reward", "judge_reward", "reward_gap", "reward_id_sim", "judge_id_sim", "id_sim_gap", "samples")}
    assert all([m.step for m in history] == [2, 4] for history in guard.values()), guard
    last = {k: history[-1].value for k, history in guard.items()}
    assert last["samples"] == 1 and last["judge_id_sim"] == 0 and last["reward_id_sim"] > 0
    assert last["id_sim_gap"] == pytest.approx(last["reward_id_sim"] - last["judge_id_sim"])
    assert last["reward_gap"] == pytest.approx(last["reward"] - last["judge_reward"])
    assert data.tags["umo.toy_world"] == "true"
    everything = str(data.params) + str(data.tags)
    assert "sentinel-secret-6f2a" not in everything
    # a resumed run continues the same MLflow run
    resumed = run("t", f"tracking.tracking_uri={mlflow_server}", "tracking.experiment=train-test",
                  "train.max_steps=6", resume="latest", tracking=True)
    assert resumed.run_id == result.run_id
    assert [m.step for m in client.get_metric_history(result.run_id, "reward")] == [1, 2, 3, 4, 5, 6]
    # a crash after MLflow got steps 1-3 and the checkpoint holds step 2: step 3 runs again, and is logged once
    uri = (f"tracking.tracking_uri={mlflow_server}", "tracking.experiment=train-test", "train.checkpoint_every=2")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run("c", *uri, reward=FlakyReward(fixed_reward(toy_world), crash={4}), tracking=True)
    crashed = json.loads((tmp_path / "c" / "checkpoints" / "checkpoint-000002" / "train_state.json").read_text())
    assert [m.step for m in client.get_metric_history(crashed["mlflow_run_id"], "loss")] == [1, 2, 3]
    done = run("c", *uri, resume="latest", tracking=True)
    assert [m.step for m in client.get_metric_history(done.run_id, "loss")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_two_processes_with_gloo_train_identical_loras(toy_world, tiny_generator_dir, manifest, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / "tests" / "trainkit.py"),
           str(toy_world.root), str(tiny_generator_dir), str(manifest), str(out), "train.max_steps=3"]
    env = os.environ | {"PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert set(r0) == set(r1) and all(torch.equal(r0[k], r1[k]) for k in r0)
    state = json.loads((out / "checkpoints" / "checkpoint-000003" / "train_state.json").read_text())
    assert state["world_size"] == 2 and state["consumed"] == 2  # 2 batches per step, in epoch 1
    assert (out / "checkpoints" / "checkpoint-000003" / "random_states_1.pkl").is_file()


def test_cli_trains_with_the_configured_reward_and_refuses_foreign_embeddings(toy_world, tiny_generator_dir,
                                                                               manifest, tmp_path, capsys, caplog):
    """`umo train` builds the reward from params (the toy world's real detector: the tiny generator draws no
    faces, so only L_diff moves the LoRA here) and checks the embeddings were made by the same embedder."""
    from trainkit import TRAIN

    from umo.cli import main

    args = ["train", "--params", str(ROOT / "params.yaml"), "--manifest", str(manifest), "--no-tracking",
            *[f"-S{o}" for o in [*toy_world.faces_overrides(), f"generator.path={tiny_generator_dir}", *TRAIN,
                                 "train.max_steps=2"]]]
    assert main([*args, "--out", str(tmp_path / "cli")]) == 0
    assert '"step": 2' in capsys.readouterr().out
    assert (tmp_path / "cli" / "lora" / LORA_FILE).is_file()
    other = tmp_path / "other.safetensors"
    other.write_bytes(Path(toy_world.reward_path).read_bytes() + b" ")
    assert main([*args, "--out", str(tmp_path / "cli2"), f"-Sfaces.embedder.path={other}"]) == 2
    assert "made by another embedder" in caplog.text and "re-run `umo prepare`" in caplog.text
    assert not (tmp_path / "cli2" / "lora").exists()
