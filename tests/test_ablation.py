"""The toy-world ablation: the arms, the paired statistics worked out by hand, the base gate that
comes before any arm, and the results page. The real experiment is `make ablation` (docs/ablation.md); here every
stage runs for real at toy sizes on the tests' small toy world and a tiny toy base."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from umo.cli import main as umo_main
from umo.config import ConfigError, load_config
from umo.eval.score import ImageScore, ItemScore
from umo.toy import ablation
from umo.toy.config import ToyBaseConfig
from umo.typed import from_dict

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "ablation" / "params.yaml"


def test_ablation_params_are_valid_and_the_arms_differ_in_one_setting_each():
    base = load_config(PARAMS)
    configs = {arm: ablation.arm_config(PARAMS, arm, 7) for arm in ("sft", "sir", "mimr")}
    for arm, config in configs.items():
        assert config.seed == 7
        assert config.generator.path == base.generator.path and config.train.max_steps == base.train.max_steps
    assert configs["sft"].train.reward_weight == 0 and configs["sft"].reward.kind == base.reward.kind
    assert configs["sir"].reward.kind == "sir" and configs["sir"].train.reward_weight == base.train.reward_weight
    assert configs["mimr"].reward.kind == "mimr" and configs["mimr"].train.reward_weight == base.train.reward_weight
    assert len(base.section("ablation").seeds) >= 6 and base.eval.images_per_item >= 4
    with pytest.raises(ValueError, match="unknown arm"):
        ablation.arm_config(PARAMS, "dpo", 0)
    with pytest.raises(ConfigError, match="arms"):
        load_config(PARAMS, ["ablation.arms=[sft, ppo]"])


def test_the_mimr_arm_is_the_main_jobs_training():
    """The ablation's shared settings are params.yaml's: what the main job trains is the MIMR arm."""
    main, abl = (yaml.safe_load(p.read_text()) for p in (ROOT / "params.yaml", PARAMS))
    for section in ("faces", "reward", "generator", "lora", "train"):
        assert abl[section] == main[section], section
    assert main["reward"]["kind"] == "mimr" and main["train"]["reward_weight"] > 0


# ------------------------------------------------------------------------------------------------ statistics


def test_t_interval_matches_a_value_worked_out_by_hand():
    mean, half = ablation.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)  # s = 1, t(.975, 2)
    assert math.isnan(ablation.t_interval([4.0])[1])


def _item(name: str, m: int, images: list[tuple[float, float | None]]) -> ItemScore:
    return ItemScore(name, m, [ImageScore(s, c, s, m, True) for s, c in images])


def test_entry_sums_pool_as_the_public_evaluators_do():
    # item a: 2 references, images with ID-Sim 0.5 and 0.7 -> 4 entries summing 2 x 0.5 + 2 x 0.7 = 2.4;
    # ID-Conf only on the first image: 2 entries of 0.5; item b: 1 reference, 0.9
    items = [_item("a", 2, [(0.5, 0.5), (0.7, None)]), _item("b", 1, [(0.9, None)])]
    s, c = ablation.entry_sums(items, "id_sim")
    assert s.tolist() == pytest.approx([2.4, 0.9]) and c.tolist() == [4, 1]
    s, c = ablation.entry_sums(items, "id_conf")
    assert s.tolist() == pytest.approx([1.0, 0.0]) and c.tolist() == [2, 0]
    s, c = ablation.entry_sums(items, "face_count_accuracy")  # once per image
    assert c.tolist() == [2, 1]


def test_paired_contrast_per_seed_with_t_and_cluster_bootstrap_by_hand():
    # 3 seeds x 2 items, 2 entries per item. Model a's per-seed pooled means: (1+3)/4, (2+3)/4, (3+3)/4 = 1.0, 1.25,
    # 1.5; model b (the base, one row): (1+1)/4 = 0.5. Differences 0.5, 0.75, 1.0: mean 0.75, s = 0.25.
    a = (np.array([[1.0, 3.0], [2.0, 3.0], [3.0, 3.0]]), np.full((3, 2), 2.0))
    b = (np.array([[1.0, 1.0]]), np.full((1, 2), 2.0))
    r = ablation.paired_contrast(a, b, scale=1.0, n_boot=2000)
    assert r["per_seed"] == [0.5, 0.75, 1.0] and r["estimate"] == 0.75 and r["seeds"] == 3
    half = stats.t.ppf(0.975, 2) * 0.25 / math.sqrt(3)
    assert r["t_lower95"] == pytest.approx(0.75 - half, abs=1e-4)
    # the bootstrap resamples items then seeds: every resample's mean difference lies within the per-item extremes
    assert 0.0 <= r["bootstrap_lower95"] <= 0.75 <= r["bootstrap_upper95"] <= 1.5
    # a seed that reverses the effect: the paired t bound drops below 0
    a2 = (np.array([[1.0, 3.0], [2.0, 3.0], [0.0, 0.0]]), np.full((3, 2), 2.0))
    assert ablation.paired_contrast(a2, b, scale=1.0, n_boot=500)["t_lower95"] < 0


def test_power_reports_what_the_seeds_could_detect():
    # differences 1, 2, 3: s = 1; detectable = t(.975, 2) / sqrt(3) = 2.484
    p = ablation.power([1.0, 2.0, 3.0])
    assert p["sd"] == 1.0 and p["detectable"] == pytest.approx(2.4841, abs=1e-3)
    assert 0 < p["power"] < 1 and p["seeds_for_80"] >= 3
    assert ablation.power([0.5]) == {"sd": None, "detectable": None, "power": None, "seeds_for_80": None}


def test_id_conf_is_compared_only_on_images_where_both_models_found_two_faces():
    a = [_item("x", 2, [(0.5, 0.8), (0.5, 0.6), (0.5, None)])]
    b = [_item("x", 2, [(0.5, 0.4), (0.5, None), (0.5, 0.9)])]
    assert ablation.both_two_face_conf(a, b) == (80.0, 40.0, 1)  # only image 0 has 2 faces in both


def test_reward_gain_compares_the_last_and_first_fifth_of_training():
    history = [{"reward": v} for v in (0.0, 0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.6)]
    assert ablation.reward_gain(history) == pytest.approx((0.4 + 0.6) / 2 - (0.0 + 0.1) / 2)


def test_summary_holds_a_hypothesis_only_when_both_lower_bounds_clear_zero():
    config = load_config(PARAMS, ["ablation.seeds=[0, 1, 2]", "ablation.bootstrap=500"])
    items = lambda sim, conf: [_item(f"i{j}", 2, [(sim + 0.01 * j, conf + 0.01 * j)] * 2) for j in range(4)]  # noqa: E731
    scores = {"base": items(0.10, 0.50)}
    for s in range(3):
        scores[f"sft-s{s}"] = items(0.10, 0.50)
        scores[f"sir-s{s}"] = items(0.20 + 0.01 * s, 0.40)
        scores[f"mimr-s{s}"] = items(0.22 + 0.01 * s, 0.60 + 0.01 * s)
    summary = ablation.summarize(config, scores)
    h1, h2 = summary["hypotheses"]["H1"], summary["hypotheses"]["H2"]
    assert h1["contrast"] == "mimr - base" and h1["per_seed"] == pytest.approx([12.0, 13.0, 14.0])
    assert h1["holds"] and h2["holds"] and h2["estimate"] == pytest.approx(21.0)
    assert summary["table"]["mimr"]["id_sim"]["seeds"] == pytest.approx([23.5, 24.5, 25.5])
    scores["mimr-s2"] = items(0.22, 0.10)  # one seed reverses H2: the mean still wins, the t bound does not
    h2 = ablation.summarize(config, scores)["hypotheses"]["H2"]
    assert h2["estimate"] > 0 and not h2["holds"]


# ------------------------------------------------------------------------------------------------ the stages


TINY_BASE = {
    "photos": {"cast": [200, 216], "image_size": [80, 128], "n_train": 24, "n_test": 3},
    "vae": {"channels": [8, 8, 8, 8], "latent_channels": 4, "steps": 3, "batch": 4, "crop": 32},
    "model": {"heads": 2, "head_dim": 16, "double_blocks": 1, "single_blocks": 1, "steps": 3, "batch": 4,
              "warmup": 1, "compile": False},
    # the untrained base draws no faces: its gate is opened to run the stages (the gate itself: test_toycast)
    "gate": {"images_per_item": 1, "steps": 2, "min_two_face_rate": 0.0, "min_id_sim": 0.0, "id_conf": None},
}
TINY = [
    "ablation.seeds=[0]", "ablation.arms=[sft, mimr]", "ablation.bootstrap=200",
    "generator.resolution=[80, 128]", "generator.reference_resolution=[32, 32]",
    "train.max_steps=2", "train.checkpoint_every=1", "train.batch_size=2", "train.sampler_steps=2",
    "train.grad_step_range=[1, 1]", "train.warmup_steps=0", "train.sample_every=0", "lora.rank=2", "lora.alpha=2",
    "eval.images_per_item=1", "eval.steps=2",
]


@pytest.fixture(scope="module")
def tiny_experiment(toy_world, tmp_path_factory):
    """A tiny toy base, then every stage of ablation/dvc.yaml through `umo ablation ...`, in a temporary folder."""
    from umo.toy.cast import build_toybase

    out = tmp_path_factory.mktemp("ablation")
    base = from_dict(ToyBaseConfig, TINY_BASE | {"toyworld": str(toy_world.root), "out": str(out / "toybase")},
                     source="test")
    build_toybase(base, workers=1)
    overrides = [*toy_world.faces_overrides(), f"ablation.out={out / 'art'}", f"ablation.toybase={out / 'toybase'}",
                 f"generator.path={out / 'toybase/generator'}", f"eval.path={out / 'toybase/photos/test.json'}",
                 f"ablation.train_manifest={out / 'toybase/photos/train.json'}",
                 f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}", *TINY]
    sets = [a for o in overrides for a in ("-S", o)]
    for arm in ("sft", "mimr"):  # sir differs from mimr in reward.kind only (see the params test)
        assert umo_main(["ablation", "arm", "--params", str(PARAMS), "--arm", arm, "--seed", "0", *sets]) == 0
    assert umo_main(["ablation", "evaluate", "--params", str(PARAMS), *sets]) == 0
    doc = out / "docs" / "ablation.md"
    doc.parent.mkdir()
    doc.write_text(f"# Hand-written title\n\nintro\n\n{ablation.START}\nthe previous results\n{ablation.END}\n\n"
                   "hand-written end\n")
    assert umo_main(["ablation", "report", "--params", str(PARAMS), "--doc", str(doc), *sets]) == 0
    return load_config(PARAMS, overrides), out, doc, sets


def test_no_arm_trains_from_a_base_that_failed_its_gate(tiny_experiment):
    config, out, _, sets = tiny_experiment
    gate_file = out / "toybase" / "gate.json"
    kept = gate_file.read_text()
    try:
        gate_file.write_text(json.dumps(json.loads(kept) | {"passed": False, "failures": ["ID-Sim 1.0 < 20.0"]}))
        assert umo_main(["ablation", "arm", "--params", str(PARAMS), "--arm", "sft", "--seed", "0", *sets]) == 1
        with pytest.raises(ablation.AblationError, match="uninformative base.*ID-Sim 1.0 < 20.0"):
            ablation.base_gate(config)
    finally:
        gate_file.write_text(kept)


def test_every_arm_trains_its_lora_from_the_same_draws_and_logs_the_reward(tiny_experiment):
    import torch
    from safetensors.torch import load_file

    config, out, _, _ = tiny_experiment
    loras, histories = {}, {}
    for arm in ("sft", "mimr"):
        run = out / "art/runs" / f"{arm}-s0"
        histories[arm] = json.loads((run / "history.json").read_text())
        assert [h["step"] for h in histories[arm]] == [1, 2]
        assert all(math.isfinite(h["reward"]) for h in histories[arm])
        loras[arm] = load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))
    # one seed, one pairing: the first step's L_diff is the same in both arms (same data, noise and t)
    assert histories["sft"][0]["diff_loss"] == pytest.approx(histories["mimr"][0]["diff_loss"], rel=1e-6)
    assert set(loras["sft"]) == set(loras["mimr"])
    assert all(torch.isfinite(v).all() for v in loras["mimr"].values())


def test_evaluation_scores_the_base_and_every_run_on_the_same_items(tiny_experiment):
    config, out, _, _ = tiny_experiment
    metrics = json.loads((out / "art/eval/metrics.json").read_text())
    assert list(metrics["models"]) == ["base", "sft-s0", "mimr-s0"]
    assert metrics["items"] == 3 and all(m["items"] == 3 for m in metrics["models"].values())
    assert all(m["references_scored"] == 6 for m in metrics["models"].values())  # 3 items x 1 image x 2 people
    assert (out / "art/eval/images/mimr-s0").is_dir() and not (out / "art/.eval.work").exists()


def test_report_fills_its_block_and_records_the_hypotheses(tiny_experiment):
    config, out, doc, _ = tiny_experiment
    text = doc.read_text()
    assert text.startswith("# Hand-written title\n\nintro\n") and text.endswith("hand-written end\n")
    assert "the previous results" not in text and text.count(ablation.START) == 1
    for row in ("| base |", "| SFT only |", "| ReReFL + MIMR |", "| H1 | mimr - base, ID-Sim |"):
        assert row in text
    assert "ReReFL + SIR" not in text and "| H2 |" not in text  # no sir arm here: H2 cannot be tested
    for fig in ("training_curves.png", "hypotheses.png", "samples.png", "summary.json"):
        assert (doc.parent / "ablation" / fig).is_file()
    summary = json.loads((doc.parent / "ablation" / "summary.json").read_text())
    assert summary["base_gate"]["passed"] is True and set(summary["base_gate"]["measured"]) >= {"id_sim", "id_conf"}
    assert set(summary["H1"]) >= {"estimate", "t_lower95", "bootstrap_lower95", "seeds", "holds"}
    assert summary["H1"]["seeds"] <= 1 and summary["H1"]["holds"] is False  # one seed: no t interval, never holds
    assert {"arm-mimr-s0", "evaluate"} <= set(summary["timings"])
