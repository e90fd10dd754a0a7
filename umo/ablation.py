"""The toy-world ablation (issue 9): SFT vs SIR vs MIMR fine-tuning of one base, judged on held-out people.

The stages of `ablation/dvc.yaml`, each a function here and a `umo ablation ...` command:

    samples   group-photo samples of the toy world (train: training identities; test: held-out ones)
    vae       the base generator's VAE, trained as an autoencoder
    base      the base generator: the VAE + a transformer trained with supervised flow matching
    arm       one fine-tuning run from the base: `umo train` with the arm's one change and a seed
    evaluate  the base and every run (its final LoRA and its mid-run checkpoint), same items and noise, judge
    report    docs/ablation.md: the table with 95% confidence intervals, curves and sample grids

The arms differ in ONE setting each, every other one is the params file's (same data, steps, learning rate,
LoRA, sampler, seeds):
    sft   train.reward_weight = 0: L_diff alone (the reward is still measured on the same draws, and logged)
    sir   reward.kind = sir: lambda * L_diff - R_SIR (each reference's best face, PAPER.md's baseline)
    mimr  reward.kind = mimr: lambda * L_diff - R_MIMR (the Hungarian matching reward)

Statistics. A run is one seed of one arm; its metric is the judge's over every test item and image. The 95%
interval of an arm is Student's t over its seeds (n - 1 degrees of freedom), so it measures how much the
RESULT of a training run varies, not the evaluation noise of one run. A comparison of two arms is Welch's t
interval of the difference of their means; against the base (one fixed model) it is the one-sample interval.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from umo.config import Config, load_config

log = logging.getLogger(__name__)

ARMS: dict[str, list[str]] = {
    "sft": ["train.reward_weight=0"],
    "sir": ["reward.kind=sir"],
    "mimr": ["reward.kind=mimr"],
}
METRICS = ("id_sim", "id_conf", "id_match", "face_count_accuracy")
BASE = "base"
MID = "mid"  # suffix of a run's mid-training checkpoint in the evaluation


def paths(config: Config) -> dict[str, Path]:
    out = Path(config.ablation.out)
    return {"out": out, "samples": out / "samples", "vae": out / "vae", "runs": out / "runs",
            "eval": out / "eval", "timings": out / "timings"}


def run_name(arm: str, seed: int) -> str:
    return f"{arm}-s{seed}"


def arm_config(params: str | Path, arm: str, seed: int, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The params file + the arm's one change + the seed (+ the caller's overrides, e.g. for tests)."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; expected one of {sorted(ARMS)}")
    return load_config(params, [*overrides, *ARMS[arm], f"seed={seed}"])


def _timed(config: Config, stage: str, started: float) -> None:
    from umo.io import atomic_write_json

    folder = paths(config)["timings"]
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / f"{stage}.json", {"stage": stage, "seconds": round(time.perf_counter() - started, 1)})


# ------------------------------------------------------------------------------------------------ stages


def make_samples(config: Config, *, workers: int = 2) -> dict[str, Any]:
    from umo.reward import MatchingReward
    from umo.toybase import write_group_samples
    from umo.toyworld.build import load_toyworld

    started = time.perf_counter()
    tw = load_toyworld(config.ablation.toyworld).config
    reward = MatchingReward.from_config(config.faces, config.reward)
    stats = write_group_samples(paths(config)["samples"], config.ablation.samples, world_seed=tw.world_seed,
                                train_ids=range(tw.n_train_identities),
                                test_ids=range(tw.n_train_identities, tw.n_identities), reward=reward,
                                embedder_path=config.faces.embedder.path, workers=workers)
    _timed(config, "samples", started)
    return stats


def make_vae(config: Config) -> dict[str, float]:
    from umo.io import atomic_dir, atomic_write_json
    from umo.toybase import new_components, train_vae

    started = time.perf_counter()
    p = paths(config)
    vae = new_components(config.ablation.vae, config.ablation.base)["vae"]
    info = train_vae(vae, p["samples"] / "train.json", config.ablation.vae)
    with atomic_dir(p["vae"]) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        atomic_write_json(tmp / "vae_metrics.json", info)
    _timed(config, "vae", started)
    return info


def make_base(config: Config) -> dict[str, float]:
    from diffusers import AutoencoderKLFlux2, Flux2KleinKVPipeline

    from umo.models.flux2 import Flux2KleinGenerator
    from umo.models.tiny import TINY_TEXT_LAYERS
    from umo.toybase import new_components, save_base, train_base

    g = config.generator
    started = time.perf_counter()
    p = paths(config)
    parts = new_components(config.ablation.vae, config.ablation.base)
    parts["vae"] = AutoencoderKLFlux2.from_pretrained(p["vae"], local_files_only=True).eval()
    gen = Flux2KleinGenerator(Flux2KleinKVPipeline(**parts, is_distilled=False), text_layers=TINY_TEXT_LAYERS,
                              max_sequence_length=g.max_sequence_length)
    info = train_base(gen, p["samples"] / "train.json", config.ablation.base, resolution=tuple(g.resolution),
                      reference_resolution=tuple(g.reference_resolution), sampler_steps=config.train.sampler_steps)
    save_base(gen, g.path, {**info, "vae": json.loads((p["vae"] / "vae_metrics.json").read_text())})
    _timed(config, "base", started)
    return info


def run_arm(params: str | Path, arm: str, seed: int, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """One fine-tuning run into <out>/runs/<arm>-s<seed>/ (a fresh folder each time: DVC owns it)."""
    import shutil

    from umo.train.loop import train

    config = arm_config(params, arm, seed, overrides)
    started = time.perf_counter()
    out = paths(config)["runs"] / run_name(arm, seed)
    shutil.rmtree(out, ignore_errors=True)
    result = train(config, manifest=paths(config)["samples"] / "train.json", out=out)
    _timed(config, f"arm-{run_name(arm, seed)}", started)
    return result.summary


def eval_models(config: Config) -> dict[str, Path | None]:
    """The base, then per run its mid-training checkpoint and its final LoRA (in arm, seed order)."""
    from umo.models.lora import LORA_FILE

    models: dict[str, Path | None] = {BASE: None}
    for arm in config.ablation.arms:
        for seed in config.ablation.seeds:
            run = paths(config)["runs"] / run_name(arm, seed)
            mid = run / "checkpoints" / f"checkpoint-{config.train.max_steps // 2:06d}" / LORA_FILE
            if mid.is_file():
                models[f"{run_name(arm, seed)}@{MID}"] = mid
            models[run_name(arm, seed)] = run / "lora" / LORA_FILE
    missing = [str(p) for p in models.values() if p is not None and not p.is_file()]
    if missing:
        raise FileNotFoundError(f"ablation: runs not trained yet (no LoRA): {', '.join(missing)}")
    return models


def evaluate_all(config: Config) -> dict[str, Any]:
    """Every model of `eval_models` on the test items with the judge -> <out>/eval/metrics.json, scores.jsonl,
    images/ (resumable: a stopped run continues where it was)."""
    import shutil
    from dataclasses import asdict

    from umo.eval.run import load_items, read_scores, score_models
    from umo.eval.score import aggregate
    from umo.io import atomic_dir, sha256_file

    started = time.perf_counter()
    p = paths(config)
    models = eval_models(config)
    items = load_items(config, p["eval"])
    work = p["eval"].with_name(f".{p['eval'].name}.work")
    score_models(config, items, models, work)
    scores = read_scores(work, items, models)
    metrics = {"items": len(items), "images_per_item": config.eval.images_per_item, "steps": config.eval.steps,
               "models": {name: {**aggregate(s, 100.0), "lora_sha256": None if models[name] is None
                                 else sha256_file(models[name])} for name, s in scores.items()}}
    with atomic_dir(p["eval"]) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        with open(tmp / "scores.jsonl", "w") as f:
            for name, item_scores in scores.items():
                for s in item_scores:
                    f.write(json.dumps({"model": name, **asdict(s)}) + "\n")
        shutil.copytree(work / "images", tmp / "images")
    shutil.rmtree(work, ignore_errors=True)
    _timed(config, "evaluate", started)
    return metrics


# ------------------------------------------------------------------------------------------------ statistics


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of Student's t interval; half-width nan for fewer than 2 values.

    >>> m, h = t_interval([1.0, 2.0, 3.0]); round(m, 3), round(h, 3)   # t(0.975, 2) = 4.303, s / sqrt(3) = 0.577
    (2.0, 2.484)
    """
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float(x.mean()) if len(x) else math.nan, math.nan
    return float(x.mean()), float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def welch_interval(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float]:
    """(mean(a) - mean(b), half-width) of Welch's t interval; nan half-width when either has < 2 values.

    >>> d, h = welch_interval([1.0, 2.0, 3.0], [0.0, 0.0, 0.0]); round(d, 3), round(h, 3)   # b has no spread
    (2.0, 2.484)
    """
    from scipy import stats

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if not len(x) or not len(y):
        return math.nan, math.nan
    if len(x) < 2 or len(y) < 2:
        return float(x.mean() - y.mean()), math.nan
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(vx + vy)
    if se == 0:
        return float(x.mean() - y.mean()), 0.0
    df = (vx + vy) ** 2 / ((vx ** 2 / (len(x) - 1) if vx else 0.0) + (vy ** 2 / (len(y) - 1) if vy else 0.0))
    return float(x.mean() - y.mean()), float(stats.t.ppf(0.5 + level / 2, df) * se)


def entry_sums(items: list, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Per item, (sum of its (image, reference) entries of `key`, their number), pooled as `aggregate` pools:
    an image's value stands for its M references' entries (ID-Sim: every image; ID-Conf: images with a value).
    face_count_accuracy and id_match count once per image. items: a model's `ItemScore`s in one fixed order."""
    per_image = key in ("face_count_accuracy", "id_match")
    attr = "count_ok" if key == "face_count_accuracy" else key
    sums, counts = np.zeros(len(items)), np.zeros(len(items))
    for j, item in enumerate(items):
        for image in item.images:
            v = getattr(image, attr)
            if v is None:
                continue
            w = 1 if per_image else item.identities
            sums[j] += float(v) * w
            counts[j] += w
    return sums, counts


def paired_contrast(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], *, scale: float = 100.0,
                    n_boot: int = 4000, level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Model a minus model b, per seed, on the same items, pooled over entries (x scale).

    a, b: (sums, counts) arrays of shape (seeds, items) (`entry_sums` per seed); b may have one row (the base:
    one model for every seed). Returns the mean over seeds of the per-seed differences with two intervals:
    - the paired t interval over the seeds' differences (n - 1 degrees of freedom);
    - a two-way cluster bootstrap: items resampled with replacement (the same items for a and b), then seeds,
      `n_boot` times; the percentile interval of the mean difference.
    A hypothesis "a - b > 0" holds only if BOTH lower bounds are above 0.

    >>> a = (np.array([[3.0, 1.0], [2.0, 2.0]]), np.ones((2, 2)) * 4)   # seed means 0.5, 0.5
    >>> b = (np.array([[1.0, 1.0]]), np.ones((1, 2)) * 4)                # 0.25
    >>> r = paired_contrast(a, b, scale=1.0, n_boot=200)
    >>> r["estimate"], r["per_seed"]
    (0.25, [0.25, 0.25])
    """
    sa, ca = (np.atleast_2d(np.asarray(x, float)) for x in a)
    sb, cb = (np.atleast_2d(np.asarray(x, float)) for x in b)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = scale * (sa.sum(1) / ca.sum(1) - sb.sum(1) / cb.sum(1))
    d = d[np.isfinite(d)]
    mean, half = t_interval(list(d), level)
    rng = np.random.default_rng(seed)
    n_seeds, n_items = sa.shape
    w = np.stack([np.bincount(rng.integers(0, n_items, n_items), minlength=n_items) for _ in range(n_boot)])
    u = np.stack([np.bincount(rng.integers(0, n_seeds, n_seeds), minlength=n_seeds) for _ in range(n_boot)])
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = scale * ((w @ sa.T) / (w @ ca.T) - (w @ sb.T) / (w @ cb.T))  # (boot, seeds)
    ok = np.isfinite(diff)
    boot = (np.where(ok, diff, 0) * u).sum(1) / np.maximum((ok * u).sum(1), 1)
    lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"estimate": round(float(mean), 4), "per_seed": [round(float(x), 4) for x in d], "seeds": int(len(d)),
            "t_half_width": None if math.isnan(half) else round(half, 4),
            "t_lower95": None if math.isnan(half) else round(mean - half, 4),
            "bootstrap_lower95": round(float(lo), 4), "bootstrap_upper95": round(float(hi), 4),
            "bootstrap": {"resamples": n_boot, "clusters": "items, then seeds", "interval": "percentile"}}


# ------------------------------------------------------------------------------------------------ report

LABELS = {"id_sim": "ID-Sim", "id_conf": "ID-Conf", "id_match": "ID-Match", "face_count_accuracy": "face count"}
ARM_TITLES = {"sft": "SFT only", "sir": "ReReFL + SIR", "mimr": "ReReFL + MIMR"}
COLOURS = {"sft": "tab:grey", "sir": "tab:orange", "mimr": "tab:blue"}


def _num(v: float | None) -> float:
    """A metric that could not be computed (None: e.g. no 2-person image with 2 faces) as nan."""
    return math.nan if v is None else float(v)


def arm_values(metrics: dict[str, Any], arm: str, seeds: list[int], key: str, suffix: str = "") -> list[float]:
    """One arm's metric over its seeds (runs without a value, e.g. no 2-person image scored, are left out)."""
    values = [metrics["models"].get(run_name(arm, s) + suffix, {}).get(key) for s in seeds]
    return [float(v) for v in values if v is not None]


def summarize(config: Config, metrics: dict[str, Any]) -> dict[str, Any]:
    """Per arm and metric: mean, 95% half-width, the per-seed values; the two tests of the issue."""
    ab = config.ablation
    base = metrics["models"][BASE]
    table: dict[str, Any] = {BASE: {k: _num(base[k]) for k in METRICS}}
    for arm in ab.arms:
        table[arm] = {}
        for key in METRICS:
            vals = arm_values(metrics, arm, ab.seeds, key)
            mean, half = t_interval(vals) if vals else (math.nan, math.nan)
            table[arm][key] = {"mean": mean, "ci95": half, "seeds": vals}
    tests = {}
    if "mimr" in ab.arms:
        d, h = t_interval([v - _num(base["id_sim"]) for v in arm_values(metrics, "mimr", ab.seeds, "id_sim")])
        tests["mimr_vs_base_id_sim"] = {"difference": d, "ci95": h, "holds": bool(d - h > 0)}
        if "sir" in ab.arms:
            d, h = welch_interval(arm_values(metrics, "mimr", ab.seeds, "id_conf"),
                                  arm_values(metrics, "sir", ab.seeds, "id_conf"))
            tests["mimr_vs_sir_id_conf"] = {"difference": d, "ci95": h, "holds": bool(d - h > 0)}
    return {"table": table, "tests": tests}


def _fmt(mean: float, half: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.2f} ± {half:.2f}" if not math.isnan(half) else f"{mean:.2f}"


def _curves(config: Config, figure: Path) -> None:
    """Training curves per arm (mean over seeds, smoothed): the logged MIMR/SIR reward, its matched and
    unmatched parts, L_diff and faces found per sample."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("reward", "reward (the arm's own kind; SFT: MIMR, measured)"), ("reward_matched", "matched part"),
            ("reward_unmatched", "unmatched part"), ("diff_loss", "L_diff"),
            ("faces_per_sample", "faces detected per sample")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    window = max(1, config.train.max_steps // 20)
    for arm in config.ablation.arms:
        runs = []
        for seed in config.ablation.seeds:
            path = paths(config)["runs"] / run_name(arm, seed) / "history.json"
            if path.is_file():
                runs.append(json.loads(path.read_text()))
        if not runs:
            continue
        n = min(len(r) for r in runs)
        steps = np.array([h["step"] for h in runs[0][:n]])
        for ax, (key, title) in zip(axes, keys):
            y = np.mean([[h.get(key, np.nan) for h in r[:n]] for r in runs], axis=0)
            smooth = np.convolve(y, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, label=ARM_TITLES[arm], color=COLOURS[arm])
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figure, dpi=90)
    plt.close(fig)


def _metric_plot(config: Config, metrics: dict[str, Any], figure: Path) -> None:
    """Judge metrics at step 0 (the base), mid-training and the end: mean over seeds with the 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ab, steps = config.ablation, config.train.max_steps
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.2))
    for ax, key in zip(axes, METRICS):
        for k, arm in enumerate(ab.arms):
            xs, ms, hs = [0.0], [_num(metrics["models"][BASE][key])], [0.0]
            for x, suffix in ((steps // 2, f"@{MID}"), (steps, "")):
                vals = arm_values(metrics, arm, ab.seeds, key, suffix)
                if vals:
                    m, h = t_interval(vals)
                    xs.append(x + (k - 1) * steps * 0.01)
                    ms.append(m)
                    hs.append(0.0 if math.isnan(h) else h)
            ax.errorbar(xs, ms, yerr=hs, label=ARM_TITLES[arm], color=COLOURS[arm], marker="o", capsize=3)
        ax.set_title(f"{LABELS[key]} (judge, held-out people)", fontsize=9)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figure, dpi=90)
    plt.close(fig)


def _sample_grid(config: Config, metrics_dir: Path, figure: Path, n_items: int = 6) -> None:
    """Rows: test items with 2 people (then 1); columns: the references, the base, then each arm's seed-0 run
    (the first of the item's images, the same noise for every model)."""
    from PIL import Image, ImageDraw

    from umo.data.manifest import read_manifest
    from umo.eval.run import from_grid
    from umo.eval.sets import file_stem

    man = read_manifest(paths(config)["samples"] / "test.json")
    items = sorted(man.samples, key=lambda s: (-len(s.references), s.id))[:n_items]
    size = config.ablation.samples.size
    models = [BASE] + [run_name(arm, config.ablation.seeds[0]) for arm in config.ablation.arms]
    ref_side = size // 2
    width = 2 * ref_side + len(models) * size
    sheet = Image.new("RGB", (width, 16 + n_items * size), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 2), "references", fill="black")
    for j, name in enumerate(models):
        draw.text((2 * ref_side + j * size + 4, 2), name, fill="black")
    for row, s in enumerate(items):
        y = 16 + row * size
        for k, ref in enumerate(s.references[:2]):
            img = Image.open(man.path(ref.path)).convert("RGB").resize((ref_side, ref_side))
            sheet.paste(img, (k * ref_side, y))
        for j, name in enumerate(models):
            grid = np.asarray(Image.open(metrics_dir / "images" / name / f"{file_stem(s.id)}.png").convert("RGB"))
            first = from_grid(grid, config.eval.images_per_item)[0]
            sheet.paste(Image.fromarray(first), (2 * ref_side + j * size, y))
    sheet.save(figure)


def write_report(config: Config, doc: str | Path) -> Path:
    """docs/ablation.md and its figures (docs/ablation/) from <out>/eval and the runs' histories."""
    from umo.io import atomic_write_bytes

    p = paths(config)
    metrics = json.loads((p["eval"] / "metrics.json").read_text())
    summary = summarize(config, metrics)
    doc = Path(doc)
    figures = doc.with_suffix("")
    figures.mkdir(parents=True, exist_ok=True)
    _curves(config, figures / "training_curves.png")
    _metric_plot(config, metrics, figures / "judge_metrics.png")
    _sample_grid(config, p["eval"], figures / "samples.png")
    records = [json.loads(f.read_text()) for f in sorted(p["timings"].glob("*.json"))]
    timings = {r["stage"]: r["seconds"] for r in records}
    (figures / "summary.json").write_text(json.dumps({"summary": summary, "timings": timings}, indent=1) + "\n")
    block = _markdown(config, metrics, summary, timings, figures.name)
    text = doc.read_text() if doc.is_file() else f"# Toy-world ablation\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        raise ValueError(f"{doc}: no '{START}' ... '{END}' block to write the results into")
    head, rest = text.split(START, 1)
    atomic_write_bytes(doc, (head + block.rstrip("\n") + rest.split(END, 1)[1]).encode())
    return doc


START, END = "<!-- umo ablation report: start -->", "<!-- umo ablation report: end -->"


def _markdown(config: Config, metrics: dict[str, Any], summary: dict[str, Any], timings: dict[str, float],
              figures: str) -> str:
    """The generated block of the page; an existing page keeps everything outside the START/END markers."""
    ab, tc = config.ablation, config.train
    lines = [START, "", f"Generated by `umo ablation report` from `{ab.out}`; {metrics['items']} held-out test items "
             f"x {metrics['images_per_item']} images per model, {metrics['steps']} sampler steps, scored by the "
             "judge (`faces.judge`, never the reward embedder). Metrics x100 except face count (a fraction); "
             "ID-Conf: higher = less confusion.", "",
             f"Runs: {len(ab.arms)} arms x {len(ab.seeds)} seeds (seeds {ab.seeds}), {tc.max_steps} steps each, "
             f"batch {tc.batch_size}, learning rate {tc.learning_rate}, LoRA rank {config.lora.rank}, "
             f"T = {tc.sampler_steps}, t in {tc.grad_step_range}. Mean ± 95% t-interval over the seeds.", "",
             "| model | " + " | ".join(LABELS[k] for k in METRICS) + " | 2-person ID-Conf |",
             "|---|" + "---|" * (len(METRICS) + 1)]
    base = metrics["models"][BASE]

    def two(name: str) -> float | None:
        return metrics["models"].get(name, {}).get("by_identities", {}).get("2", {}).get("id_conf")

    lines.append("| base | " + " | ".join(_fmt(_num(base[k]), math.nan) for k in METRICS)
                 + f" | {_fmt(_num(two(BASE)), math.nan)} |")
    for arm in ab.arms:
        row = summary["table"][arm]
        pair = [v for v in (two(run_name(arm, s)) for s in ab.seeds) if v is not None]
        lines.append(f"| {ARM_TITLES[arm]} | " + " | ".join(_fmt(row[k]["mean"], row[k]["ci95"]) for k in METRICS)
                     + f" | {_fmt(*t_interval(pair)) if pair else 'n/a'} |")
    lines += ["", "Per seed (final LoRA):", "", "| run | " + " | ".join(LABELS[k] for k in METRICS) + " |",
              "|---|" + "---|" * len(METRICS)]
    for arm in ab.arms:
        for s in ab.seeds:
            m = metrics["models"][run_name(arm, s)]
            lines.append(f"| {run_name(arm, s)} | " + " | ".join(_fmt(_num(m[k]), math.nan) for k in METRICS) + " |")
    lines += ["", "The issue's two expectations (difference, 95% interval; holds = the whole interval above 0):", ""]
    names = {"mimr_vs_base_id_sim": "MIMR - base, ID-Sim", "mimr_vs_sir_id_conf": "MIMR - SIR, ID-Conf"}
    for key, t in summary["tests"].items():
        lines.append(f"- {names[key]}: {_fmt(t['difference'], t['ci95'])} -> "
                     f"{'holds' if t['holds'] else 'NOT shown at 95%'}")
    total = sum(timings.values())
    lines += ["", "Wall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
              + f"; total {total / 60:.1f} min.", "",
              f"![judge metrics over training]({figures}/judge_metrics.png)", "",
              f"![training curves]({figures}/training_curves.png)", "",
              f"![samples: references, base, each arm's seed-{ab.seeds[0]} run]({figures}/samples.png)", "", END]
    return "\n".join(lines) + "\n"
