"""`umo evaluate` end to end on the tiny generator and the small toy world's judge (evalkit explains the fixed
faces), on our held-out manifest and on XVerseBench- and OmniContext-format sets written here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from evalkit import EVAL, eval_config, fixed_judges, random_lora
from PIL import Image
from servers import free_port
from trainkit import make_manifest

from umo.eval.report import BY_IDENTITIES
from umo.eval.run import evaluate
from umo.eval.score import score_item
from umo.eval.sets import file_stem
from umo.images import from_grid

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("base", "candidate", "champion")


def evaluate_with(config, **kw):
    """evaluate() with the sections of one params file."""
    return evaluate(config.eval, generator=config.generator, faces=config.faces, **kw)


@pytest.fixture(scope="module")
def setup(toy_world, tiny_generator_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    manifest = make_manifest(root / "heldout", toy_world)
    config = eval_config(toy_world, tiny_generator_dir, manifest)
    return {"root": root, "manifest": manifest, "config": config,
            "with": lambda *overrides: eval_config(toy_world, tiny_generator_dir, manifest, *overrides),
            "candidate": random_lora(config, root / "cand", 1),
            "champion": random_lora(config, root / "champ", 2)}


@pytest.fixture(scope="module")
def report(setup):
    config = setup["config"]
    return evaluate_with(config, lora=setup["candidate"], champion=setup["champion"], judges=fixed_judges(config),
                         out=setup["root"] / "report")


def read_scores(out: Path) -> dict[str, dict[str, dict]]:
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    return {m: {r["item"]: r for r in rows if r["model"] == m} for m in {r["model"] for r in rows}}


def test_the_report_holds_every_model_and_its_numbers_add_up(report):
    m, out = report.metrics, report.out
    scores = read_scores(out)
    assert sorted(scores) == sorted(MODELS) and all(len(s) == 4 for s in scores.values())
    for name in MODELS:  # pooled over (item, image, reference) entries, x100, recomputed from scores.jsonl
        entries = [(i["id_sim"], r["identities"]) for r in scores[name].values() for i in r["images"]]
        assert m[name]["id_sim"] == pytest.approx(
            100 * sum(v * n for v, n in entries) / sum(n for _, n in entries), abs=1e-3)
        assert m[name]["items"] == 4 and m[name]["unscored"] == 0 and m[name]["scale"] == 100
        assert m[name]["face_count_accuracy"] == 1.0  # two fixed faces, two people
        # the held-out targets show both people: every image is measured against its ground truth, CP pooled
        # over faces like ID-Sim over references
        assert m[name]["gt_images_measured"] == m[name]["images_scored"] == 8
        cps = [(i["copy_paste"], r["identities"]) for r in scores[name].values() for i in r["images"]]
        assert m[name]["copy_paste"] == pytest.approx(sum(v * n for v, n in cps) / sum(n for _, n in cps), abs=1e-3)
        assert -3 < m[name]["copy_paste"] < 3 and 0 < m[name]["sim_gt"] <= 100
    assert m["delta"]["id_sim"] == pytest.approx(m["candidate"]["id_sim"] - m["base"]["id_sim"], abs=1e-3)
    assert m["delta_vs_champion"]["id_conf"] == pytest.approx(m["candidate"]["id_conf"] - m["champion"]["id_conf"],
                                                              abs=1e-3)
    # the LoRAs are applied: each model scores differently, from the same seeds
    assert len({m[name]["id_sim"] for name in MODELS}) == 3
    assert all(scores["base"][i]["seeds"] == scores["candidate"][i]["seeds"] for i in scores["base"])
    assert m["toy_world"] is True and m["benchmark"] == "heldout"

    text = (out / "report.md").read_text()
    assert "| metric | base | candidate | Δ vs base | champion | Δ vs champion |" in text and "Toy world" in text
    # every judge is reported; the first decides the gate, and the report says so
    assert m["gate_judge"] == "toy_r10" and list(m["judges"]) == ["toy_r10", "toy_mbf"]
    assert {k: m["judges"]["toy_r10"][k] for k in MODELS} == {k: m[k] for k in MODELS}
    other = m["judges"]["toy_mbf"]
    assert other["candidate"]["references_scored"] == m["candidate"]["references_scored"] == 16
    assert other["candidate"]["id_sim"] != m["candidate"]["id_sim"]  # another network: other similarities
    assert other["paired"]["candidate - base"]["id_sim"]["items"] == 4
    assert "the gate decides on the first, `toy_r10`" in text and "| `toy_mbf` |" in text
    assert f"| ID-Sim | {m['base']['id_sim']:.4g} | {m['candidate']['id_sim']:.4g} |" in text
    plots = json.loads((out / "plots" / "by_identities.json").read_text())
    assert plots == [{"identities": 2, **{f"{name}_{k}": m[name]["by_identities"]["2"][k] for name in MODELS
                                          for k in BY_IDENTITIES}}]
    items = json.loads((out / "plots" / "items.json").read_text())
    changes = [p["change"] for p in items]
    assert changes == sorted(changes, reverse=True)
    # every grid has its picture of the matching: the same 2x2 layout, each image with its boxes and pairs
    for name in MODELS:
        assert sorted(p.name for p in (out / "matching" / name).iterdir()) == \
            sorted(p.name for p in (out / "images" / name).iterdir())
    image = scores["candidate"][items[0]["item"]]["images"][0]
    assert len(image["boxes"]) == 2 and np.asarray(image["sims"]).shape == (2, 2)  # two fixed faces, two people
    picture = np.asarray(Image.open(out / "matching" / "candidate" / f"{items[0]['item']}.png"))
    grid = np.asarray(Image.open(out / "images" / "candidate" / f"{items[0]['item']}.png"))
    assert picture.shape[0] > grid.shape[0] and picture.shape[1] > grid.shape[1]  # enlarged, thumbnails beside
    grids = sorted(p.name for p in (out / "grids").iterdir())
    assert grids == [f"improved-1-{items[0]['item']}.png", f"regressed-1-{items[-1]['item']}.png"]
    assert changes[0] > 0 > changes[-1]
    sheet = Image.open(out / "grids" / grids[0])
    assert sheet.size == (88 + 2 * 64, 4 * 64)  # label + 2 columns; references, base, candidate, champion rows
    assert not (out.parent / ".report.work").exists()


def test_the_scores_are_those_of_the_saved_images(report, setup):
    judge = next(iter(fixed_judges(setup["config"]).values()))
    stored = read_scores(report.out)["candidate"]["s1"]
    grid = np.asarray(Image.open(report.out / "images" / "candidate" / "s1.png").convert("RGB"))
    assert grid.shape == (64, 128, 3)  # 2 images of 64 x 64: one row of two
    from umo.eval.sets import load_heldout
    from umo.images import decode_rgb

    item = next(i for i in load_heldout(setup["manifest"]) if i.id == "s1")
    refs, missing = judge.references([decode_rgb(p, max_pixels=None)[0] for p in item.references])
    assert missing == []
    again = score_item("s1", refs, [e for _, e in judge.faces(from_grid(grid, 2))])
    assert [i.id_sim for i in again.images] == pytest.approx([i["id_sim"] for i in stored["images"]], abs=1e-6)


def test_a_zero_lora_reproduces_the_base_images_exactly(setup):
    config = setup["config"]
    zero = random_lora(config, setup["root"] / "zero", 3, scale=0.0)
    result = evaluate_with(config, lora=zero, judges=fixed_judges(config), out=setup["root"] / "zero-report")
    for item in ("s0", "s1", "s2", "s3"):
        base = (result.out / "images" / "base" / f"{item}.png").read_bytes()
        assert (result.out / "images" / "candidate" / f"{item}.png").read_bytes() == base
    assert result.metrics["delta"]["id_sim"] == 0.0
    assert not (result.out / "grids").exists()  # nothing improved or regressed


class StopAfter:
    """The gate's judge, failing (as a crash would) after `limit` generated batches; counts what it scores."""

    def __init__(self, judge, limit: int | None = None) -> None:
        self.judge, self.limit, self.calls = judge, limit, 0
        self.detector = judge.detector

    def detect(self, images):
        return self.judge.detect(images)

    def references(self, images, detections=None):
        return self.judge.references(images, detections)

    def target(self, image, detections=None):
        return self.judge.target(image, detections)

    def faces(self, images, detections=None):
        self.calls += 1
        if self.limit is not None and self.calls > self.limit:
            raise KeyboardInterrupt("stopped")
        return self.judge.faces(images, detections)


def stopping(config, limit: int | None = None) -> tuple[dict, StopAfter]:
    """Every judge, the first wrapped in StopAfter (the others are asked after it, so they stop with it)."""
    (first, judge), *rest = fixed_judges(config).items()
    stop = StopAfter(judge, limit)
    return {first: stop, **dict(rest)}, stop


def test_a_stopped_run_resumes_where_it_stopped_and_new_settings_start_over(setup, report, caplog):
    config, out = setup["config"], setup["root"] / "resumed"
    with pytest.raises(KeyboardInterrupt):
        evaluate_with(config, lora=setup["candidate"], champion=setup["champion"], judges=stopping(config, 5)[0],
                 out=out)
    assert not out.exists()
    assert len(list((out.parent / ".resumed.work" / "scores").rglob("*.json"))) == 5
    judges, judge = stopping(config)
    result = evaluate_with(config, lora=setup["candidate"], champion=setup["champion"], judges=judges, out=out)
    assert judge.calls == 3 * 4 - 5
    assert {k: result.metrics[k] for k in MODELS} == {k: report.metrics[k] for k in MODELS}

    with pytest.raises(KeyboardInterrupt):
        evaluate_with(config, lora=setup["candidate"], judges=stopping(config, 1)[0], out=out)
    reseeded = setup["with"]("eval.seed=7")
    judges, judge = stopping(config)
    evaluate_with(reseeded, lora=setup["candidate"], judges=judges, out=out)
    assert judge.calls == 2 * 4 and "starting over" in caplog.text


def portrait(path: Path, identity: int, seed: int = 0) -> Path:
    from umo.toy.world.identity import make_identity
    from umo.toy.world.render import render_portrait

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(render_portrait(make_identity(0, identity), np.random.default_rng(seed), (128, 128)).image
                    ).save(path)
    return path


def test_an_xverse_set_is_generated_in_grids_of_four_and_faceless_people_are_counted(setup, toy_world):
    bench = setup["root"] / "XVerseBench"
    first = toy_world.config.n_train_identities
    portrait(bench / "sample" / "human" / "a.png", first + 20)
    portrait(bench / "sample" / "human" / "b.png", first + 21)
    Image.fromarray(np.full((128, 128, 3), 90, np.uint8)).save(bench / "sample" / "human" / "blank.png")
    (bench / "sample" / "object").mkdir()
    Image.fromarray(np.full((128, 128, 3), 200, np.uint8)).save(bench / "sample" / "object" / "cup.png")

    def item(index, *paths):
        return {"index": index, "prompt": "two people and a cup",
                "modulation": [{"src_inputs": [{"image_path": f"sample/{p}", "caption": ""} for p in paths]}]}

    (bench / "multi.json").write_text(json.dumps([item(0, "human/a.png", "object/cup.png", "human/b.png"),
                                                  item(1, "human/a.png", "human/blank.png"),
                                                  item(2, "object/cup.png")]))
    config = setup["with"]("eval.benchmark=xverse", f"eval.path={bench / 'multi.json'}",
                              "eval.images_per_item=4")
    result = evaluate_with(config, lora=setup["candidate"], judges=fixed_judges(config), out=setup["root"] / "xverse")
    m = result.metrics
    assert (m["base"]["items"], m["base"]["unscored"], m["base"]["scale"]) == (1, 1, 100)
    # item 2 has no person: left out, and the report says so (160 of 300 were once dropped silently)
    assert m["items_left_out"] == {"no_human_reference": 1}
    assert "Not evaluated: 1 items of the benchmark (1 no human reference)." in (result.out / "report.md").read_text()
    grid = Image.open(result.out / "images" / "candidate" / "0.png")
    assert grid.size == (128, 128)  # 2 x 2 grid of 64 x 64
    assert not (result.out / "images" / "candidate" / "1.png").exists()  # not generated: it cannot be scored
    unscored = read_scores(result.out)["base"]["1"]
    assert unscored["unscored"] == "no face found in reference blank.png" and unscored["images"] == []
    scores = read_scores(result.out)["base"]["0"]
    assert scores["identities"] == 2 and len(scores["images"]) == 4 and len(set(scores["seeds"])) == 4


def test_an_omnicontext_set_is_scored_on_the_tenth_scale_without_faceless_inputs(setup, toy_world):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    first = toy_world.config.n_train_identities

    def data(path):
        buf = io.BytesIO()
        Image.open(path).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}

    src = setup["root"] / "omni-src"
    a, b = portrait(src / "a.png", first + 30), portrait(src / "b.png", first + 31)
    Image.fromarray(np.full((128, 128, 3), 40, np.uint8)).save(src / "robot.png")
    root = setup["root"] / "OmniContext"
    (root / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([
        {"key": "mc/1", "task_type": "multiple_character", "instruction": "two friends",
         "input_images": [data(a), data(src / "robot.png"), data(b)]},
        {"key": "so/1", "task_type": "single_object", "instruction": "a cup", "input_images": [data(src / "robot.png")]},
    ]), root / "data" / "test-00000-of-00001.parquet")
    config = setup["with"]("eval.benchmark=omnicontext", f"eval.path={root}")
    result = evaluate_with(config, lora=setup["candidate"], judges=fixed_judges(config), out=setup["root"] / "omni")
    m = result.metrics
    row = read_scores(result.out)["candidate"]["mc/1"]
    assert (m["candidate"]["items"], m["candidate"]["scale"], row["identities"]) == (1, 10, 2)
    assert m["candidate"]["id_sim"] == pytest.approx(10 * np.mean([i["id_sim"] for i in row["images"]]), abs=1e-3)
    assert (result.out / "images" / "candidate" / f"{file_stem('mc/1')}.png").is_file()


@pytest.mark.slow
def test_two_processes_with_gloo_give_the_numbers_of_one(setup, toy_world, tiny_generator_dir):
    """Both under torchrun with one thread per process: the same numeric environment, so the same bits."""
    runs = {}
    for n in (1, 2):
        out = setup["root"] / f"procs{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "tests" / "evalkit.py"),
               str(toy_world.root), str(tiny_generator_dir), str(setup["manifest"]), str(setup["candidate"]),
               str(out)]
        env = os.environ | {"PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert all(f"process {r}/{n} has {4 // n} to do" in proc.stderr for r in range(n))
        runs[n] = out
    one, two = (json.loads((runs[n] / "metrics.json").read_text()) for n in (1, 2))
    assert {k: two[k] for k in ("base", "candidate", "delta")} == {k: one[k] for k in ("base", "candidate", "delta")}
    assert read_scores(runs[2]) == read_scores(runs[1])
    for image in sorted((runs[1] / "images").rglob("*.png")):
        assert (runs[2] / image.relative_to(runs[1])).read_bytes() == image.read_bytes()


def test_the_cli_evaluates_with_the_configured_judge_and_names_a_missing_lora(setup, toy_world, tiny_generator_dir,
                                                                               capsys, caplog):
    from umo.cli import main

    args = ["evaluate", *sum((["-S", o] for o in [*toy_world.faces_overrides(), f"generator.path={tiny_generator_dir}",
                                                  f"eval.path={setup['manifest']}", *EVAL, "eval.max_items=2",
                                                  "eval.images_per_item=1"]), [])]
    assert main([*args, "--lora", str(setup["root"] / "nothing"), "--out", str(setup["root"] / "cli")]) == 2
    assert "nothing" in caplog.text and "no LoRA file" in caplog.text
    assert main([*args, "--lora", str(setup["candidate"].parent), "--out", str(setup["root"] / "cli")]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((setup["root"] / "cli" / "metrics.json").read_text())
    # the real toy detector finds no face in what a random tiny generator paints: nothing matches, counted
    assert metrics["candidate"]["items"] == 2 and metrics["candidate"]["face_count_accuracy"] == 0.0
    assert metrics["candidate"]["id_sim"] == 0.0 and metrics["candidate"]["id_conf"] is None
    assert "report.md" in printed


def test_dvc_reads_the_report_through_the_projects_dvc_yaml(report, tmp_path):
    """DVC's own `metrics show` and `plots show` on the report, placed where the project's dvc.yaml expects it."""
    import shutil

    import yaml

    dvc = Path(sys.executable).parent / "dvc"
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({k: spec[k] for k in ("metrics", "plots")}))
    shutil.copytree(report.out, tmp_path / "artifacts" / "reports" / "heldout")
    shutil.copytree(report.out, tmp_path / "artifacts" / "reports" / "scaling")  # the scaling set's, same layout
    env = os.environ | {"DVC_NO_ANALYTICS": "1"}
    subprocess.run([dvc, "init", "--no-scm", "-q"], check=True, cwd=tmp_path, env=env)
    shown = subprocess.run([dvc, "metrics", "show", "--json"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert shown.returncode == 0, shown.stderr
    (workspace,) = json.loads(shown.stdout).values()  # one revision: the workspace ("" without git)
    metrics = workspace["data"]["artifacts/reports/heldout/metrics.json"]["data"]
    assert metrics["candidate"]["id_sim"] == report.metrics["candidate"]["id_sim"]
    plots = subprocess.run([dvc, "plots", "show", "--json"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert plots.returncode == 0, plots.stderr
    text = plots.stdout
    assert not json.loads(text).get("errors"), text[:2000]
    assert "base_id_sim" in text and "candidate_id_conf" in text and '"rank"' in text
    assert "improved-1-" in text and "regressed-1-" in text  # the comparison grids, as image plots


def test_evaluate_scaling_needs_a_set_and_compares_with_the_base_only(caplog):
    from umo.cli import main

    assert main(["evaluate", "--lora", "x", "--scaling", "-S", "eval.scaling.path=null"]) == 2
    assert "--scaling: eval.scaling.path is null" in caplog.text
    assert main(["evaluate", "--lora", "x", "--scaling", "--champion", "registry"]) == 2
    assert "compares the candidate with the base only" in caplog.text
