"""The approval gate refuses empty evidence: no faces scored, too few scored references, a metric not
measured. Each refusal names what is missing; a sound report still passes.

Versions are registered with the real `register` on the session's `mlflow server` (conftest `mlflow_server`), each
test under its own model name so that no champion of another test takes part; the reports are written by hand
(their numbers are the point here, not how an evaluation makes them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from umo.config import ConfigError, GateConfig, load_config
from umo.eval.score import ImageScore, ItemScore, aggregate
from umo.package import serve_settings
from umo.registry import gate, register, rules

MIN = GateConfig().min_scored_references  # 16, params.yaml's too


def register_from(config, **kw):
    """register() with the sections of one params file."""
    return register(config.registry, config.tracking, serving=serve_settings(config), lora=config.lora, **kw)


def column(id_sim: float, /, **changes) -> dict:
    """One model's metrics as `aggregate` writes them: 4 items x 2 images x 2 people, two faces found in each."""
    col = {"items": 4, "id_sim": id_sim, "id_conf": 40.0, "id_match": id_sim - 1.0, "face_count_accuracy": 1.0,
           "scale": 100.0, "unscored": 0, "by_identities": {}, "images_scored": 8, "faces_scored": 16,
           "references_scored": 16, "copy_paste": 0.2, "collision_rate": 0.1}
    return col | changes


def report(root: Path, seed: int, base: dict, candidate: dict, paired: dict | None = None) -> tuple[Path, Path]:
    """A training folder holding a LoRA file (its bytes differ by seed) and a report folder of it."""
    from safetensors.numpy import save_file

    from umo.io import sha256_file

    lora = root / f"train-{seed}" / "lora" / "pytorch_lora_weights.safetensors"
    lora.parent.mkdir(parents=True)
    save_file({"w": np.random.default_rng(seed).standard_normal((4, 4)).astype(np.float32)}, str(lora))
    metrics = {"benchmark": "heldout", "toy_world": True, "images_per_item": 2, "steps": 3, "seed": 0,
               "base": base, "candidate": candidate, "delta": {},
               "models": {"base": None, "candidate": {"path": str(lora), "sha256": sha256_file(lora)}}}
    if paired is not None:
        metrics["paired"] = {"candidate - base": paired}
    out = root / f"report-{seed}"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps(metrics))
    (out / "report.md").write_text("# Evaluation\n")
    return lora.parent.parent, out


@pytest.fixture
def decide(mlflow_server, tmp_path, request):
    """(base column, candidate column) -> (the gate's decision, the version's tags) on a model of this test's own."""
    import mlflow

    name = f"evidence-{request.node.name}".replace("[", "-").replace("]", "")[:100]
    settings = [f"tracking.tracking_uri={mlflow_server}", f"registry.model_name={name}",
                f"generator.path={tmp_path / 'no-generator'}"]

    def run(base: dict, candidate: dict, paired: dict | None = None):
        # without intervals the point estimates decide: the evidence rules are what these tests are about
        config = load_config(None, [*settings, f"registry.gate.use_intervals={str(paired is not None).lower()}"])
        if paired is not None:  # copy-paste and collapse unchanged, unless the test says otherwise
            paired = {"copy_paste": ci(0.0, -0.02, 0.02), "collision_rate": ci(0.0, -0.02, 0.02)} | paired
        train, out = report(tmp_path, 0, base, candidate, paired)
        version = register_from(config, train_dir=train, report=out).version
        decision = gate(config.registry, config.tracking, version=version)
        tags = mlflow.MlflowClient(mlflow_server).get_model_version(name, version).tags
        return decision, tags

    return run


def failed(decision) -> dict[str, str]:
    return {r.name: r.detail for r in decision.rules if not r.passed}


def test_a_sound_report_passes_and_its_evidence_is_on_the_version(decide):
    decision, tags = decide(column(30.0), column(32.0))
    assert decision.passed and not failed(decision)
    assert [r.name for r in decision.rules] == ["faces_scored", "references_scored", "id_sim", "id_conf",
                                                "face_count", "all_scored", "copy_paste", "collapse"]
    assert tags["gate.decision"] == "passed"
    assert tags["gate.rule.faces_scored"] == ("pass: the judge found 16 faces in the candidate's 8 images; the judge "
                                              "found 16 faces in the base's 8 images")
    assert tags["eval.candidate.faces_scored"] == "16" and tags["eval.base.references_scored"] == "16"
    assert json.loads(tags["gate.policy"])["min_scored_references"] == MIN


def test_no_faces_scored_is_a_refusal_not_a_tie(decide):
    # the judge found no face anywhere: ID-Sim 0 for both, which the old gate passed as `0 >= 0 + 0`
    blind = {"id_sim": 0.0, "id_conf": None, "id_match": 0.0, "face_count_accuracy": 0.0, "faces_scored": 0}
    decision, tags = decide(column(0.0, **blind), column(0.0, **blind))
    assert not decision.passed and tags["gate.decision"] == "failed"
    why = failed(decision)
    assert set(why) == {"faces_scored", "id_conf"}
    assert "no faces scored: the judge found 0 faces in the candidate's 8 images" in why["faces_scored"]
    assert "the judge found 0 faces in the base's 8 images" in why["faces_scored"]
    assert why["id_conf"] == "not measured for the candidate nor for the base"
    assert tags["gate.rule.faces_scored"].startswith("fail: no faces scored: the judge found 0 faces")
    assert tags["gate.rule.id_sim"].startswith("pass:")  # the tie itself holds; the evidence rule refuses it


def test_no_faces_in_the_base_leaves_nothing_to_beat(decide):
    decision, _ = decide(column(0.0, faces_scored=0, id_conf=None), column(30.0))
    why = failed(decision)
    assert not decision.passed and set(why) == {"faces_scored", "id_conf"}
    assert "no faces scored: the judge found 0 faces in the base's 8 images" in why["faces_scored"]
    assert why["id_conf"] == "measured for the candidate (40) but not for the base: nothing to compare with"


def test_fewer_scored_references_than_the_minimum_is_a_refusal(decide):
    few = {"items": 2, "images_scored": 2, "faces_scored": 4, "references_scored": 4}
    decision, tags = decide(column(30.0, **few), column(32.0, **few))
    why = failed(decision)
    assert not decision.passed and set(why) == {"references_scored"}
    assert (f"too few scored references: 4 (item, image, reference) scored for the candidate, fewer than "
            f"min_scored_references {MIN}") in why["references_scored"]
    assert tags["gate.rule.references_scored"].startswith("fail: too few scored references: 4")


def test_a_metric_not_measured_for_the_candidate_is_a_refusal(decide):
    decision, tags = decide(column(30.0), column(32.0, id_conf=None))
    why = failed(decision)
    assert not decision.passed and why == {"id_conf": "not measured for the candidate"}
    assert tags["gate.rule.id_conf"] == "fail: not measured for the candidate"


SEEN = column(30.0)


@pytest.mark.parametrize("base, candidate, rule, detail", [
    (SEEN, column(32.0, id_sim=None), "id_sim", "not measured for the candidate"),
    (column(30.0, face_count_accuracy=None), column(32.0, face_count_accuracy=None), "face_count",
     "not measured for the candidate nor for the base"),
    (SEEN, {k: v for k, v in column(32.0).items() if k != "unscored"}, "all_scored",
     "the number of unscored items is not recorded for the candidate"),
    # a report written before the counts existed has no evidence of faces or references
    (SEEN, {k: v for k, v in column(32.0).items() if not k.endswith("_scored")}, "faces_scored",
     "the report does not record how many faces the judge found for the candidate"),
    (SEEN, {k: v for k, v in column(32.0).items() if not k.endswith("_scored")}, "references_scored",
     "the report does not record how many references were scored for the candidate"),
])
def test_missing_evidence_fails_its_rule(base, candidate, rule, detail):
    out = {r.name: r for r in rules(GateConfig(), {"base": base, "candidate": candidate}, champion_sha=None)}
    assert not out[rule].passed and detail in out[rule].detail


def test_a_champion_column_without_faces_or_id_sim_is_refused():
    metrics = {"base": SEEN, "candidate": column(32.0), "champion": column(0.0, id_sim=None, faces_scored=0),
               "models": {"champion": {"sha256": "abc"}}}
    out = {r.name: r for r in rules(GateConfig(), metrics, champion_sha="abc")}
    assert not out["faces_scored"].passed and "0 faces in the champion's 8 images" in out["faces_scored"].detail
    assert not out["champion"].passed and out["champion"].detail == "measured for the candidate (32) but not for " \
                                                                   "the champion: nothing to compare with"


def test_aggregate_counts_images_faces_and_references():
    a = ItemScore("a", 2, [ImageScore(0.5, 0.5, 0.4, 2, True), ImageScore(0.0, None, 0.0, 0, False)])
    b = ItemScore("b", 1, [ImageScore(0.9, None, 0.9, 3, False)])
    c = ItemScore("c", 2, unscored="no face found in reference x.png")
    r = aggregate([a, b, c], 100)
    assert (r["images_scored"], r["faces_scored"], r["references_scored"]) == (3, 5, 5)
    empty = aggregate([c], 100)  # nothing scored: zeros to refuse on, and no means
    assert (empty["images_scored"], empty["faces_scored"], empty["references_scored"], empty["id_sim"]) == \
        (0, 0, 0, None)


def test_the_minimum_must_be_positive():
    with pytest.raises(ConfigError, match="min_scored_references: expected >= 1, got 0"):
        load_config(None, ["registry.gate.min_scored_references=0"])


def ci(difference: float, lower: float, upper: float) -> dict:
    return {"difference": difference, "lower": lower, "upper": upper, "level": 0.95, "items": 4,
            "resamples": 2000, "method": "paired item bootstrap"}


def test_intervals_pass_a_gain_they_show_beside_a_drop_they_cannot_resolve(decide):
    # the main job of session 10: ID-Sim +3.15 [+1.84, +4.39], ID-Conf -0.66 [-3.93, +2.74], face count +0.044
    shown = {"id_sim": ci(3.15, 1.84, 4.39), "id_conf": ci(-0.66, -3.93, 2.74),
             "face_count_accuracy": ci(0.044, 0.01, 0.08)}
    decision, tags = decide(column(22.66, id_conf=58.24), column(25.81, id_conf=57.58), shown)
    assert decision.passed, failed(decision)
    assert tags["gate.rule.id_conf"] == ("pass: candidate - base -0.66, 95% [-3.93, +2.74] over 4 items: upper bound "
                                         "+2.74 >= +0")
    assert json.loads(tags["gate.policy"])["use_intervals"] is True


def test_intervals_refuse_a_gain_they_do_not_show_and_a_drop_they_show(decide):
    noisy = {"id_sim": ci(0.3, -0.9, 1.5), "id_conf": ci(-3.0, -5.5, -0.4), "face_count_accuracy": ci(0, -0.1, 0.1)}
    decision, _ = decide(column(30.0), column(30.3, id_conf=37.0), noisy)
    assert failed(decision) == {
        "id_sim": "candidate - base +0.3, 95% [-0.9, +1.5] over 4 items: lower bound -0.9 < +0",
        "id_conf": "candidate - base -3, 95% [-5.5, -0.4] over 4 items: upper bound -0.4 < +0"}


def test_a_report_without_intervals_is_refused_when_they_decide():
    out = {r.name: r for r in rules(GateConfig(), {"base": SEEN, "candidate": column(32.0)}, champion_sha=None)}
    assert [n for n, r in out.items() if not r.passed] == ["id_sim", "id_conf", "face_count", "copy_paste",
                                                           "collapse"]
    assert out["id_sim"].detail == ("the report has no paired interval of candidate - base (evaluate again, or set "
                                    "registry.gate.use_intervals: false)")


def test_copy_paste_and_collapse_may_not_rise_beyond_their_margins():
    policy = GateConfig(use_intervals=False)  # margins 0.05, params.yaml's
    base = column(30.0)  # copy-paste 0.2, collapse 0.1
    out = {r.name: r for r in rules(policy, {"base": base, "candidate": column(32.0, copy_paste=0.26,
                                                                               collision_rate=0.14)},
                                    champion_sha=None)}
    assert (out["copy_paste"].passed, out["collapse"].passed) == (False, True)
    assert out["copy_paste"].detail == "candidate 0.26 > base 0.2 + 0.05"
    assert out["collapse"].detail == "candidate 0.14 <= base 0.1 + 0.05"
    # with intervals the rise must be shown: +0.06 whose lower bound is +0.01 is within the margin, +0.2 [+0.1, ...]
    # is not
    intervals = {"candidate - base": {"copy_paste": ci(0.06, 0.01, 0.11), "collision_rate": ci(0.2, 0.1, 0.3)}}
    out = {r.name: r for r in rules(GateConfig(), {"base": base, "candidate": column(32.0, copy_paste=0.26,
                                                                                     collision_rate=0.3),
                                                   "paired": intervals}, champion_sha=None)}
    assert out["copy_paste"].passed and not out["collapse"].passed
    assert out["collapse"].detail == ("candidate - base +0.2, 95% [+0.1, +0.3] over 4 items: lower bound +0.1 > "
                                      "+0.05")
    # not measured (a benchmark without ground truth): refused, unless the rule is switched off
    blind = {"base": column(30.0, copy_paste=None), "candidate": column(32.0, copy_paste=None)}
    assert {r.name: r.detail for r in rules(policy, blind, champion_sha=None)}["copy_paste"] == \
        "not measured for the candidate nor for the base"
    off = GateConfig(use_intervals=False, max_copy_paste_rise=None)
    assert "copy_paste" not in {r.name for r in rules(off, blind, champion_sha=None)}
    with pytest.raises(ConfigError, match="max_collapse_rise: expected >= 0 or null, got -0.1"):
        load_config(None, ["registry.gate.max_collapse_rise=-0.1"])


def test_paired_interval_on_hand_worked_items():
    from umo.eval.score import paired_interval

    # every item moves by exactly +0.1 on ID-Sim: each resample gives +10, so the interval is the point
    a = [ItemScore(k, 2, [ImageScore(0.3 + 0.1 * j, 0.5, 0.3, 2, True)] * 2) for j, k in enumerate("abc")]
    b = [ItemScore(k, 2, [ImageScore(0.2 + 0.1 * j, 0.5, 0.2, 2, True)] * 2) for j, k in enumerate("abc")]
    r = paired_interval(a, b, "id_sim", scale=100.0)
    assert (r["difference"], r["lower"], r["upper"], r["items"]) == (10.0, 10.0, 10.0, 3)
    # ID-Conf pools only images with a value: item c has none for b, so b's mean is over a and b's 8 entries
    b[2] = ItemScore("c", 2, [ImageScore(0.4, None, 0.2, 1, False)] * 2)
    a[0] = ItemScore("a", 2, [ImageScore(0.3, 0.9, 0.3, 2, True)] * 2)
    r = paired_interval(a, b, "id_conf", scale=100.0)
    assert r["difference"] == pytest.approx(100 * ((0.9 * 4 + 0.5 * 8) / 12 - 0.5), abs=1e-4)  # +13.33, rounded
    assert r["lower"] <= r["difference"] <= r["upper"]
    # face count: once per image, a fraction (no scale)
    r = paired_interval(a, b, "face_count_accuracy", scale=100.0)
    assert r["difference"] == pytest.approx(1 - 4 / 6, abs=1e-4)
    assert paired_interval(a, [], "id_sim", scale=100.0) is None  # nothing shared: nothing to compare
