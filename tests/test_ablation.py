"""The toy-world ablation (issue 9): group photos, the base generator's stages, the arms, the statistics and
the results page. The real experiment is `make ablation` (docs/ablation.md); here every stage runs for real at
toy sizes on the tests' small toy world."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from umo import ablation
from umo.cli import main as umo_main
from umo.config import ConfigError, load_config
from umo.data.manifest import load_embeddings, read_manifest
from umo.toyworld.identity import make_identity
from umo.toyworld.render import render_group

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "ablation" / "params.yaml"


# ------------------------------------------------------------------------------------------------ group photos


@pytest.mark.parametrize("k", [1, 2, 3])
def test_group_photo_puts_everyone_in_frame_in_a_row(k):
    people = [make_identity(0, i) for i in (5, 17, 230)[:k]]
    scene = render_group(0, people, np.random.default_rng(k), 192)
    assert scene.image.shape == (192, 192, 3)
    assert sorted(scene.identity_ids.tolist()) == sorted(p.identity_id for p in people)
    boxes = scene.boxes
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 191).all()
    centres = (boxes[:, 0] + boxes[:, 2]) / 2
    assert (np.diff(centres) > 0.5 * (boxes[:, 2] - boxes[:, 0]).mean()).all()  # apart, left to right
    widths = boxes[:, 2] - boxes[:, 0]
    assert np.allclose(widths, 192 * (0.36 if k < 3 else 0.27), rtol=0.12)
    assert scene.caption == f"a group photo of {['one person', 'two people', 'three people'][k - 1]}"


def test_group_photo_refuses_bad_input():
    a, b = make_identity(0, 1), make_identity(0, 2)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="distinct"):
        render_group(0, [a, a], rng)
    with pytest.raises(ValueError, match="1..4"):
        render_group(0, [], rng)
    with pytest.raises(ValueError, match=">= 128"):
        render_group(0, [a, b], rng, 96)
    with pytest.raises(ValueError, match="belongs to world 0, not 1"):
        render_group(1, [a], rng)


def test_references_are_portraits_or_the_faces_cut_from_the_target():
    from umo.config import AblationSamplesConfig
    from umo.toybase import _reference_crop, render_group_sample

    cfg = AblationSamplesConfig()
    target, caption, cut = render_group_sample(0, [5, 17], 3, cfg, "target")
    again, _, portraits = render_group_sample(0, [5, 17], 3, cfg, "portrait")
    # the same photo either way: the portraits are drawn after it
    scene = render_group(0, [make_identity(0, 5), make_identity(0, 17)], np.random.default_rng([cfg.seed, 3]), 128)
    assert np.array_equal(target, scene.image) and np.array_equal(again, scene.image)
    assert caption == "a group photo of two people"
    for ref, portrait, pid in zip(cut, portraits, (5, 17)):  # the references keep the sample's order
        j = int(np.flatnonzero(scene.identity_ids == pid)[0])
        assert np.array_equal(ref, _reference_crop(scene.image, scene.boxes[j], 1.5, 128))
        assert ref.shape == portrait.shape == (128, 128, 3) and not np.array_equal(ref, portrait)
    with pytest.raises(ConfigError, match="train_references"):
        load_config(PARAMS, ["ablation.samples.train_references=web"])


def test_ablation_params_are_valid_and_the_arms_differ_in_one_setting_each():
    base = load_config(PARAMS)
    configs = {arm: ablation.arm_config(PARAMS, arm, 7) for arm in ("sft", "sir", "mimr")}
    for arm, config in configs.items():
        assert config.seed == 7
        assert config.generator.path == base.generator.path and config.train.max_steps == base.train.max_steps
    assert configs["sft"].train.reward_weight == 0 and configs["sft"].reward.kind == base.reward.kind
    assert configs["sir"].reward.kind == "sir" and configs["sir"].train.reward_weight == base.train.reward_weight
    assert configs["mimr"].reward.kind == "mimr" and configs["mimr"].train.reward_weight == base.train.reward_weight
    with pytest.raises(ValueError, match="unknown arm"):
        ablation.arm_config(PARAMS, "dpo", 0)
    with pytest.raises(ConfigError, match="arms"):
        load_config(PARAMS, ["ablation.arms=[sft, ppo]"])
    with pytest.raises(ConfigError, match="people"):
        load_config(PARAMS, ["ablation.samples.people=[1, 5]"])


# ------------------------------------------------------------------------------------------------ statistics


def test_intervals_match_values_worked_out_by_hand():
    mean, half = ablation.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)  # s = 1, t(.975, 2)
    # a = [1, 2, 3]: mean 2, var 1;  b = [2, 4, 6, 8]: mean 5, var 20/3
    # se^2 = 1/3 + (20/3)/4 = 2;  Welch df = 2^2 / ((1/3)^2 / 2 + (5/3)^2 / 3) = 4 / (1/18 + 25/27)
    diff, half = ablation.welch_interval([1.0, 2.0, 3.0], [2.0, 4.0, 6.0, 8.0])
    df = 4 / (1 / 18 + 25 / 27)
    assert diff == -3.0 and half == pytest.approx(stats.t.ppf(0.975, df) * math.sqrt(2), rel=1e-9)
    assert math.isnan(ablation.t_interval([4.0])[1]) and math.isnan(ablation.welch_interval([1.0], [2.0, 3.0])[1])


def _metrics(values: dict[str, dict[str, float]]) -> dict:
    models = {}
    for name, v in values.items():
        models[name] = {"id_sim": v["id_sim"], "id_conf": v["id_conf"], "id_match": v.get("id_match", 0.0),
                        "face_count_accuracy": v.get("fc", 1.0), "by_identities": {"2": {"id_conf": v["id_conf"]}}}
    return {"items": 2, "images_per_item": 1, "steps": 2, "models": models}


def test_summary_tests_hold_only_when_the_whole_interval_is_above_zero():
    config = load_config(PARAMS)
    values = {"base": {"id_sim": 10.0, "id_conf": 50.0}}
    for s, (sft, sir, mimr) in enumerate([(10, 20, 21), (11, 22, 22), (12, 24, 23)]):
        values[f"sft-s{s}"] = {"id_sim": float(sft), "id_conf": 50.0}
        values[f"sir-s{s}"] = {"id_sim": float(sir), "id_conf": 40.0 + s}
        values[f"mimr-s{s}"] = {"id_sim": float(mimr), "id_conf": 60.0 + s}
    summary = ablation.summarize(config, _metrics(values))
    assert summary["table"]["mimr"]["id_sim"]["mean"] == 22.0
    assert summary["table"]["mimr"]["id_sim"]["seeds"] == [21.0, 22.0, 23.0]
    sim = summary["tests"]["mimr_vs_base_id_sim"]  # differences 11, 12, 13: mean 12, s = 1
    assert sim["difference"] == 12.0 and sim["ci95"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert sim["holds"]
    conf = summary["tests"]["mimr_vs_sir_id_conf"]  # 61 vs 41, equal spreads
    assert conf["difference"] == 20.0 and conf["holds"]
    values["mimr-s2"]["id_conf"] = 10.0  # one bad seed: the mean still wins, the interval no longer excludes 0
    conf = ablation.summarize(config, _metrics(values))["tests"]["mimr_vs_sir_id_conf"]
    assert conf["difference"] > 0 and not conf["holds"]


# ------------------------------------------------------------------------------------------------ the stages


TINY = [
    "ablation.samples.n_train=12", "ablation.samples.n_test=4", "ablation.samples.size=128",
    "ablation.vae.channels=[8, 8, 16, 16]", "ablation.vae.latent_channels=4", "ablation.vae.steps=3",
    "ablation.vae.batch=4", "ablation.vae.crop=32",
    "ablation.base.heads=2", "ablation.base.head_dim=16", "ablation.base.double_blocks=1",
    "ablation.base.single_blocks=1", "ablation.base.steps=3", "ablation.base.batch=4", "ablation.base.warmup=1",
    "ablation.base.shift=null",  # klein's own shift: from sigma 0.8 the untrained base's draws hold a face or two
    "ablation.seeds=[0]", "ablation.arms=[sft, mimr]", "generator.resolution=[128, 128]", "generator.reference_resolution=[32, 32]",
    "train.max_steps=2", "train.checkpoint_every=1", "train.batch_size=2", "train.sampler_steps=2",
    "train.grad_step_range=[1, 1]", "train.warmup_steps=0", "train.sample_every=0", "lora.rank=2", "lora.alpha=2",
    "eval.images_per_item=1", "eval.steps=2",
]


@pytest.fixture(scope="module")
def tiny_experiment(toy_world, tmp_path_factory):
    """Every stage of ablation/dvc.yaml through `umo ablation ...`, at toy sizes, in a temporary folder."""
    out = tmp_path_factory.mktemp("ablation")
    overrides = [*toy_world.faces_overrides(), f"ablation.out={out / 'art'}", f"generator.path={out / 'art/base'}",
                 f"eval.path={out / 'art/samples/test.json'}", f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}",
                 f"ablation.toyworld={toy_world.root}", *TINY]
    sets = [a for o in overrides for a in ("-S", o)]
    for stage in ("samples", "vae", "base"):
        assert umo_main(["ablation", stage, "--params", str(PARAMS), *sets]) == 0
    for arm in ("sft", "mimr"):  # sir differs from mimr in reward.kind only (see the params test)
        assert umo_main(["ablation", "arm", "--params", str(PARAMS), "--arm", arm, "--seed", "0", *sets]) == 0
    assert umo_main(["ablation", "evaluate", "--params", str(PARAMS), *sets]) == 0
    doc = out / "docs" / "ablation.md"
    doc.parent.mkdir()
    doc.write_text(f"# Hand-written title\n\nintro\n\n{ablation.START}\nthe previous results\n{ablation.END}\n\n"
                   "hand-written end\n")
    assert umo_main(["ablation", "report", "--params", str(PARAMS), "--doc", str(doc), *sets]) == 0
    return load_config(PARAMS, overrides), out, doc


def test_samples_split_people_by_identity_and_carry_reward_embeddings(tiny_experiment, toy_world):
    config, out, _ = tiny_experiment
    n_train = toy_world.config.n_train_identities
    train = read_manifest(out / "art/samples/train.json")
    test = read_manifest(out / "art/samples/test.json")
    ids = {split: {int(r.identity.split("/")[1]) for s in m.samples for r in s.references}
           for split, m in (("train", train), ("test", test))}
    assert max(ids["train"]) < n_train <= min(ids["test"])
    assert sorted(len(s.references) for s in test.samples) == [1, 1, 2, 2]
    emb = load_embeddings(train)
    assert all(emb[s.id].shape == (len(s.references), 128) for s in train.samples)
    assert train.embedder["sha256"] and train.toy_world
    stats_ = json.loads((out / "art/samples/stats.json").read_text())
    assert stats_["train_samples"] + stats_["dropped_no_reference_face"] == 12


def test_base_generator_is_a_loadable_klein_folder_whose_weights_were_trained(tiny_experiment):
    from umo.models import load_generator
    from umo.toybase import new_components

    config, out, _ = tiny_experiment
    gen = load_generator(config.generator, dtype=torch.float32, device="cpu")
    assert type(gen.pipe).__name__ == "Flux2KleinKVPipeline"
    fresh = new_components(config.ablation.vae, config.ablation.base)
    for name in ("transformer", "vae"):
        trained, untrained = getattr(gen, name).state_dict(), fresh[name].state_dict()
        changed = [k for k in untrained if not torch.equal(trained[k], untrained[k])]
        assert len(changed) > len(untrained) // 2, name
    info = json.loads((Path(config.generator.path) / "umo_toy_base.json").read_text())
    assert info["base_loss"] > 0 and info["vae"]["vae_l1"] > 0


def test_every_arm_trains_its_lora_and_logs_the_reward(tiny_experiment):
    from safetensors.torch import load_file

    config, out, _ = tiny_experiment
    loras = {}
    for arm in ("sft", "mimr"):
        run = out / "art/runs" / f"{arm}-s0"
        history = json.loads((run / "history.json").read_text())
        assert [h["step"] for h in history] == [1, 2] and all(math.isfinite(h["reward"]) for h in history)
        loras[arm] = load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))
        assert (run / "checkpoints" / "checkpoint-000001").is_dir()  # the mid-training point
    # the same seed and draws: only the objective differs, so the LoRAs differ (where the reward saw a face)
    assert any(h["faces_per_sample"] > 0 for h in json.loads((out / "art/runs/mimr-s0/history.json").read_text()))
    assert any(not torch.equal(loras["sft"][k], loras["mimr"][k]) for k in loras["sft"])


def test_evaluation_scores_the_base_every_run_and_its_mid_checkpoint(tiny_experiment):
    config, out, _ = tiny_experiment
    metrics = json.loads((out / "art/eval/metrics.json").read_text())
    assert list(metrics["models"]) == ["base", "sft-s0@mid", "sft-s0", "mimr-s0@mid", "mimr-s0"]
    assert metrics["items"] == 4 and all(m["items"] == 4 for m in metrics["models"].values())
    assert (out / "art/eval/images/mimr-s0").is_dir() and not (out / "art/.eval.work").exists()


def test_report_fills_its_block_and_keeps_the_hand_written_page(tiny_experiment):
    config, out, doc = tiny_experiment
    text = doc.read_text()
    assert text.startswith("# Hand-written title\n\nintro\n") and text.endswith("hand-written end\n")
    assert "the previous results" not in text and text.count(ablation.START) == 1
    for row in ("| base |", "| SFT only |", "| ReReFL + MIMR |", "| sft-s0 |", "| mimr-s0 |"):
        assert row in text
    assert "MIMR - base, ID-Sim" in text and "ReReFL + SIR" not in text
    for fig in ("training_curves.png", "judge_metrics.png", "samples.png", "summary.json"):
        assert (doc.parent / "ablation" / fig).is_file()
    timings = json.loads((doc.parent / "ablation" / "summary.json").read_text())["timings"]
    assert {"samples", "vae", "base", "arm-mimr-s0", "evaluate"} <= set(timings)
