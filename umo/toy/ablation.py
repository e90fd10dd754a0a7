"""The toy-world ablation: SFT vs SIR vs MIMR fine-tuning of ONE base, paired by seed.

The base is the toy base (`umo toybase build`, main dvc.yaml stage `toybase`): it draws the people of its
references with identity and confuses them measurably, and it passed its gate. The stages of
`ablation/dvc.yaml`, each a function here and a `umo ablation ...` command:

    arm       one fine-tuning run from the base: `umo train` with the arm's one change and a seed, on the main
              chain's train samples (photo sessions of the cast); refused while the base's gate has not passed
    evaluate  the base and every run's final LoRA on the base's held-out cast photos, the same noise for every
              model, scored by the judge (never the reward's embedder)
    report    docs/ablation.md's results block and docs/ablation/ (summary.json, figures)

The arms differ in ONE setting each; data, steps, learning rate, LoRA, sampler and seeds are shared:
    sft   train.reward_weight = 0: L_diff alone (the reward is still measured on the same draws, and logged)
    sir   reward.kind = sir: lambda * L_diff - R_SIR (each reference's best face, the paper's baseline)
    mimr  reward.kind = mimr: lambda * L_diff - R_MIMR (the Hungarian matching reward)
A seed fixes a run's data order, noise, t draws and LoRA init, the same in every arm: runs of one seed are a
matched set.

Pre-registered hypotheses (fixed before any run, never changed after):
    H1  MIMR - base > 0 on ID-Sim
    H2  MIMR - SIR > 0 on ID-Conf
Each contrast is computed per seed, pooled over the test entries as the public evaluators pool them
(`umo.eval.score`), then tested twice: a paired t interval over the seeds' differences, and a two-way cluster
bootstrap (items resampled, then seeds). A hypothesis holds only if BOTH 95% lower bounds are above 0.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import stats

from umo.config import Config, load_config
from umo.eval.run import load_items, read_scores, score_models
from umo.eval.score import ItemScore, aggregate, entry_sums
from umo.eval.sets import file_stem, load_heldout
from umo.images import from_grid
from umo.io import atomic_dir, atomic_write_bytes, atomic_write_json, sha256_file
from umo.models.lora import LORA_FILE
from umo.train.loop import train

log = logging.getLogger(__name__)

ARMS: dict[str, list[str]] = {
    "sft": ["train.reward_weight=0"],
    "sir": ["reward.kind=sir"],
    "mimr": ["reward.kind=mimr"],
}
METRICS = ("id_sim", "id_conf", "id_match", "face_count_accuracy", "collision_rate")
HYPOTHESES = {  # name: (model a, model b, metric): "a - b > 0"
    "H1": ("mimr", "base", "id_sim"),
    "H2": ("mimr", "sir", "id_conf"),
}
EXPLORATORY = {  # not pre-registered (added after the first run's table): what the reward adds to L_diff alone
    "mimr - sft, ID-Sim": ("mimr", "sft", "id_sim"),
    "mimr - sft, ID-Conf": ("mimr", "sft", "id_conf"),
    "sir - sft, ID-Sim": ("sir", "sft", "id_sim"),
}
BASE = "base"


class AblationError(RuntimeError):
    """The ablation cannot run (its base did not pass the gate, a run is missing)."""


def paths(config: Config) -> dict[str, Path]:
    out = Path(config.section("ablation").out)
    return {"out": out, "runs": out / "runs", "eval": out / "eval", "timings": out / "timings",
            "toybase": Path(config.section("ablation").toybase)}


def run_name(arm: str, seed: int) -> str:
    return f"{arm}-s{seed}"


def arm_config(params: str | Path, arm: str, seed: int, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The params file + the arm's one change + the seed (+ the caller's overrides, e.g. for tests)."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; expected one of {sorted(ARMS)}")
    return load_config(params, [*overrides, *ARMS[arm], f"seed={seed}"])


def _timed(config: Config, stage: str, started: float) -> None:
    folder = paths(config)["timings"]
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / f"{stage}.json", {"stage": stage, "seconds": round(time.perf_counter() - started, 1)})


# ------------------------------------------------------------------------------------------------ stages


def base_gate(config: Config) -> dict[str, Any]:
    """The toy base's gate record; raises AblationError unless it passed (nothing is fine-tuned from a base that
    cannot show anything)."""
    path = paths(config)["toybase"] / "gate.json"
    if not path.is_file():
        raise AblationError(f"{path}: the toy base has no gate record; run `umo toybase build` (dvc stage toybase)")
    gate = json.loads(path.read_text())
    if not gate.get("passed"):
        raise AblationError(f"{path}: uninformative base, no arm is trained: {'; '.join(gate.get('failures', []))}")
    return gate


def run_arm(params: str | Path, arm: str, seed: int, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """One fine-tuning run into <out>/runs/<arm>-s<seed>/ (a fresh folder each time: DVC owns it)."""
    config = arm_config(params, arm, seed, overrides)
    base_gate(config)
    started = time.perf_counter()
    out = paths(config)["runs"] / run_name(arm, seed)
    shutil.rmtree(out, ignore_errors=True)
    result = train(config.train, generator=config.generator, lora=config.lora, reward=config.reward,
                   faces=config.faces, seed=config.seed, manifest=Path(config.section("ablation").train_manifest),
                   out=out, tracking=config.tracking)
    _timed(config, f"arm-{run_name(arm, seed)}", started)
    return result.summary


def eval_models(config: Config) -> dict[str, Path | None]:
    """The base, then every run's final LoRA (in arm, seed order)."""
    models: dict[str, Path | None] = {BASE: None}
    for arm in config.section("ablation").arms:
        for seed in config.section("ablation").seeds:
            models[run_name(arm, seed)] = paths(config)["runs"] / run_name(arm, seed) / "lora" / LORA_FILE
    missing = [str(p) for p in models.values() if p is not None and not p.is_file()]
    if missing:
        raise AblationError(f"ablation: runs not trained yet (no LoRA): {', '.join(missing)}")
    return models


def evaluate_all(config: Config) -> dict[str, Any]:
    """Every model of `eval_models` on the test items with the judge -> <out>/eval/metrics.json, scores.jsonl,
    images/ (resumable: a stopped run continues where it was)."""
    started = time.perf_counter()
    p = paths(config)
    models = eval_models(config)
    items = load_items(config.eval, p["eval"])
    work = p["eval"].with_name(f".{p['eval'].name}.work")
    score_models(config.eval, config.generator, config.faces, items, models, work)
    scores = next(iter(read_scores(work, items, models).values()))  # the gate's judge
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


def read_item_scores(eval_dir: Path) -> dict[str, list]:
    """scores.jsonl -> per model its `ItemScore`s in item-id order (the same order for every model)."""
    out: dict[str, list] = {}
    with open(eval_dir / "scores.jsonl") as f:
        for line in f:
            d = json.loads(line)
            out.setdefault(d["model"], []).append(ItemScore.from_dict(d))
    for name in out:
        out[name].sort(key=lambda s: s.item)
    return out


# ------------------------------------------------------------------------------------------------ statistics


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of Student's t interval; half-width nan for fewer than 2 values.

    >>> m, h = t_interval([1.0, 2.0, 3.0]); round(m, 3), round(h, 3)   # t(0.975, 2) = 4.303, s / sqrt(3) = 0.577
    (2.0, 2.484)
    """
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float(x.mean()) if len(x) else math.nan, math.nan
    return float(x.mean()), float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


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


def power(per_seed: list[float], level: float = 0.95) -> dict[str, Any]:
    """What the paired t test over these seeds could see: the spread of the per-seed differences, the smallest
    mean difference its interval would put above 0 (with this spread), the power to detect the observed mean
    (noncentral t), and the seeds that 80% power would need at that mean and spread."""
    d = np.asarray(per_seed, float)
    n = len(d)
    if n < 2 or d.std(ddof=1) == 0:
        return {"sd": None, "detectable": None, "power": None, "seeds_for_80": None}
    sd = float(d.std(ddof=1))

    def pw(k: int) -> float:
        crit = stats.t.ppf(0.5 + level / 2, k - 1)
        return float(stats.nct.sf(crit, k - 1, d.mean() / (sd / math.sqrt(k))))

    need = next((k for k in range(2, 501) if pw(k) >= 0.8), None) if d.mean() > 0 else None
    return {"sd": round(sd, 4), "detectable": round(float(stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)), 4),
            "power": round(pw(n), 3), "seeds_for_80": need}


def both_two_face_conf(a: list, b: list) -> tuple[float | None, float | None, int]:
    """ID-Conf of models a and b (x100, pooled) over only the images where BOTH found >= 2 faces (image k of an
    item has the same noise in every model), and how many such images there are."""
    sa = sb = w = 0.0
    n = 0
    for ia, ib in zip(a, b):
        for xa, xb in zip(ia.images, ib.images):
            if xa.id_conf is not None and xb.id_conf is not None:
                sa, sb, w, n = sa + xa.id_conf * ia.identities, sb + xb.id_conf * ia.identities, w + ia.identities, n + 1
    return (round(100 * sa / w, 4) if w else None, round(100 * sb / w, 4) if w else None, n)


def reward_gain(history: list[dict[str, Any]], key: str = "reward", share: float = 0.2) -> float | None:
    """The training reward's mean over the last `share` of steps minus its mean over the first."""
    values = [h[key] for h in history if h.get(key) is not None]
    k = max(1, int(len(values) * share))
    return None if len(values) < 2 else float(np.mean(values[-k:]) - np.mean(values[:k]))


def summarize(config: Config, scores: dict[str, list], histories: dict[str, list[dict]] | None = None) -> dict:
    """The table (per arm: mean ± 95% t over seeds of each judge metric, and the per-seed values), the
    pre-registered hypotheses, and the secondary measures. scores: per model its ItemScores (same item order)."""
    ab = config.section("ablation")
    histories = histories or {}

    def pooled(model: str, key: str) -> float | None:
        s, c = entry_sums(scores[model], key)
        scale = 1.0 if key in ("face_count_accuracy", "collision_rate") else 100.0
        return round(float(s.sum() / c.sum()) * scale, 4) if c.sum() else None

    def stacked(model: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        names = [BASE] if model == BASE else [run_name(model, s) for s in ab.seeds]
        rows = [entry_sums(scores[n], key) for n in names]
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

    table: dict[str, Any] = {BASE: {k: pooled(BASE, k) for k in METRICS}}
    for arm in ab.arms:
        table[arm] = {}
        for key in METRICS:
            vals = [v for v in (pooled(run_name(arm, s), key) for s in ab.seeds) if v is not None]
            mean, half = t_interval(vals) if vals else (math.nan, math.nan)
            table[arm][key] = {"mean": None if math.isnan(mean) else round(mean, 4),
                               "ci95": None if math.isnan(half) else round(half, 4), "seeds": vals}
    hypotheses = {}
    for name, (a, b, key) in HYPOTHESES.items():
        if a not in ab.arms or (b != BASE and b not in ab.arms):
            continue
        r = paired_contrast(stacked(a, key), stacked(b, key), n_boot=ab.bootstrap)
        r |= {"contrast": f"{a} - {b}", "metric": key, "pairing": "by seed (same data order, noise, t draws, LoRA "
              "init), the same items and image noise for both models",
              "holds": bool(r["t_lower95"] is not None and r["t_lower95"] > 0 and r["bootstrap_lower95"] > 0),
              "power": power(r["per_seed"])}
        hypotheses[name] = r
    exploratory = {name: paired_contrast(stacked(a, key), stacked(b, key), n_boot=ab.bootstrap)
                   for name, (a, b, key) in EXPLORATORY.items() if {a, b} <= set(ab.arms)}
    secondary: dict[str, Any] = {"reward_vs_judge": {}, "id_conf_both_two_faces": {}, "exploratory": exploratory}
    for arm in ab.arms:
        gains = [reward_gain(histories.get(run_name(arm, s), [])) for s in ab.seeds]
        judge = [pooled(run_name(arm, s), "id_sim") - pooled(BASE, "id_sim") for s in ab.seeds]
        gains = [g for g in gains if g is not None]
        secondary["reward_vs_judge"][arm] = {
            "reward_gain": dict(zip(("mean", "ci95"), map(lambda x: round(x, 4), t_interval(gains)))) if gains else None,
            "judge_id_sim_gain": dict(zip(("mean", "ci95"), map(lambda x: round(x, 4), t_interval(judge))))}
    pairs = [(arm, BASE) for arm in ab.arms] + ([("mimr", "sir")] if {"mimr", "sir"} <= set(ab.arms) else [])
    for a, b in pairs:
        per_seed = []
        for s in ab.seeds:
            xa, xb, n = both_two_face_conf(scores[run_name(a, s)], scores[BASE if b == BASE else run_name(b, s)])
            if xa is not None:
                per_seed.append({"seed": s, a: xa, b: xb, "images": n})
        diffs = [d[a] - d[b] for d in per_seed]
        mean, half = t_interval(diffs) if diffs else (math.nan, math.nan)
        secondary["id_conf_both_two_faces"][f"{a} - {b}"] = {
            "difference": None if math.isnan(mean) else round(mean, 4),
            "ci95": None if math.isnan(half) else round(half, 4), "per_seed": per_seed}
    return {"table": table, "hypotheses": hypotheses, "secondary": secondary}


# ------------------------------------------------------------------------------------------------ report

LABELS = {"id_sim": "ID-Sim", "id_conf": "ID-Conf", "id_match": "ID-Match", "face_count_accuracy": "face count",
          "collision_rate": "collision"}
ARM_TITLES = {"sft": "SFT only", "sir": "ReReFL + SIR", "mimr": "ReReFL + MIMR"}
COLOURS = {"sft": "tab:grey", "sir": "tab:orange", "mimr": "tab:blue"}
START, END = "<!-- umo ablation report: start -->", "<!-- umo ablation report: end -->"


def _histories(config: Config) -> dict[str, list[dict]]:
    out = {}
    for arm in config.section("ablation").arms:
        for seed in config.section("ablation").seeds:
            path = paths(config)["runs"] / run_name(arm, seed) / "history.json"
            if path.is_file():
                out[run_name(arm, seed)] = json.loads(path.read_text())
    return out


def _curves(config: Config, histories: dict[str, list[dict]], figure: Path) -> None:
    """Training curves per arm (mean over seeds, smoothed): the logged reward (the arm's own kind; SFT: MIMR,
    measured), its matched and unmatched parts, L_diff and faces found per sample."""
    import matplotlib  # lazy: pyplot must load after the Agg backend is chosen, and only the report draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above

    keys = [("reward", "reward (SFT: MIMR, measured)"), ("reward_matched", "matched part"),
            ("reward_unmatched", "unmatched part"), ("diff_loss", "L_diff"), ("faces_per_sample", "faces per sample")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    window = max(1, config.train.max_steps // 20)
    for arm in config.section("ablation").arms:
        runs = [histories[run_name(arm, s)] for s in config.section("ablation").seeds if run_name(arm, s) in histories]
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


def _contrast_plot(summary: dict[str, Any], figure: Path) -> None:
    """Each hypothesis: its per-seed differences (dots), the mean, the t and bootstrap intervals."""
    import matplotlib  # lazy: pyplot must load after the Agg backend is chosen, and only the report draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above

    hyps = summary["hypotheses"]
    fig, axes = plt.subplots(1, max(1, len(hyps)), figsize=(4.5 * max(1, len(hyps)), 3.2), squeeze=False)
    for ax, (name, h) in zip(axes[0], hyps.items()):
        d = h["per_seed"]
        ax.scatter(np.zeros(len(d)) + np.linspace(-0.08, 0.08, len(d)), d, color="tab:blue", zorder=3)
        if h["t_half_width"] is not None:
            ax.errorbar([0.3], [h["estimate"]], yerr=[[h["t_half_width"]], [h["t_half_width"]]], fmt="o",
                        capsize=4, color="black", label="paired t 95%")
        ax.errorbar([0.5], [h["estimate"]], yerr=[[h["estimate"] - h["bootstrap_lower95"]],
                                                  [h["bootstrap_upper95"] - h["estimate"]]],
                    fmt="s", capsize=4, color="tab:red", label="cluster bootstrap 95%")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlim(-0.3, 0.8)
        ax.set_xticks([])
        ax.set_title(f"{name}: {h['contrast']}, {LABELS[h['metric']]} ({'holds' if h['holds'] else 'not shown'})",
                     fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figure, dpi=90)
    plt.close(fig)


def _sample_grid(config: Config, eval_dir: Path, figure: Path, n_items: int = 6) -> None:
    """Rows: test items; columns: the two references, the base, then each arm's first-seed run (each model's
    first image of the item: the same noise for every model)."""
    items = sorted(load_heldout(config.eval.path), key=lambda i: i.id)[:n_items]
    h, w = config.generator.resolution
    models = [BASE] + [run_name(arm, config.section("ablation").seeds[0]) for arm in config.section("ablation").arms]
    ref = h
    width = 2 * ref + len(models) * w
    sheet = Image.new("RGB", (width, 16 + len(items) * h), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 2), "references", fill="black")
    for j, name in enumerate(models):
        draw.text((2 * ref + j * w + 4, 2), name.split("-s")[0] if name != BASE else "base", fill="black")
    for row, item in enumerate(items):
        y = 16 + row * h
        for k, path in enumerate(item.references[:2]):
            sheet.paste(Image.open(path).convert("RGB").resize((ref, ref)), (k * ref, y))
        for j, name in enumerate(models):
            grid = np.asarray(Image.open(eval_dir / "images" / name / f"{file_stem(item.id)}.png").convert("RGB"))
            sheet.paste(Image.fromarray(from_grid(grid, config.eval.images_per_item)[0]), (2 * ref + j * w, y))
    sheet = sheet.resize((sheet.width * 2, sheet.height * 2), Image.Resampling.NEAREST)
    sheet.save(figure)


def write_report(config: Config, doc: str | Path) -> Path:
    """docs/ablation.md's results block, and docs/ablation/ (summary.json, figures), from <out>/eval and the
    runs' histories."""
    p = paths(config)
    metrics = json.loads((p["eval"] / "metrics.json").read_text())
    histories = _histories(config)
    summary = summarize(config, read_item_scores(p["eval"]), histories)
    gate = base_gate(config)
    doc = Path(doc)
    figures = doc.with_suffix("")
    figures.mkdir(parents=True, exist_ok=True)
    _curves(config, histories, figures / "training_curves.png")
    _contrast_plot(summary, figures / "hypotheses.png")
    _sample_grid(config, p["eval"], figures / "samples.png")
    timings = {json.loads(f.read_text())["stage"]: json.loads(f.read_text())["seconds"]
               for f in sorted(p["timings"].glob("*.json"))}
    record = {"base_gate": {"measured": gate["measured"], "passed": gate["passed"], "bounds": gate["gate"]},
              **{name: {k: h[k] for k in ("estimate", "t_lower95", "bootstrap_lower95", "seeds", "holds")} | h
                 for name, h in summary["hypotheses"].items()},
              "table": summary["table"], "secondary": summary["secondary"], "timings": timings,
              "evaluation": {k: metrics[k] for k in ("items", "images_per_item", "steps")}
              | {"references_scored": {m: v.get("references_scored") for m, v in metrics["models"].items()},
                 "faces_scored": {m: v.get("faces_scored") for m, v in metrics["models"].items()}}}
    (figures / "summary.json").write_text(json.dumps(record, indent=1) + "\n")
    block = _markdown(config, metrics, summary, gate, timings, figures.name)
    text = doc.read_text() if doc.is_file() else f"# Toy-world ablation\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        raise ValueError(f"{doc}: no '{START}' ... '{END}' block to write the results into")
    head, rest = text.split(START, 1)
    atomic_write_bytes(doc, (head + block.rstrip("\n") + rest.split(END, 1)[1]).encode())
    return doc


def _fmt(mean: float | None, half: float | None = None) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{mean:.2f} ± {half:.2f}" if half is not None and not math.isnan(half) else f"{mean:.2f}"


def _markdown(config: Config, metrics: dict[str, Any], summary: dict[str, Any], gate: dict[str, Any],
              timings: dict[str, float], figures: str) -> str:
    """The generated block of the page; an existing page keeps everything outside the START/END markers."""
    ab, tc = config.section("ablation"), config.train
    g = gate["measured"]
    m0 = metrics["models"][BASE]
    lines = [START, "",
             f"Generated by `umo ablation report` from `{ab.out}`. The base passed its gate on "
             f"{gate.get('items')} held-out cast photos x {gate.get('images_per_item')} images: 2-face rate "
             f"{g['two_face_rate']}, ID-Sim {g['id_sim']}, ID-Conf {g['id_conf']} (bounds: "
             f"{gate['gate']['min_two_face_rate']}, {gate['gate']['min_id_sim']}, {gate['gate']['id_conf']}; chance: "
             "ID-Sim about 1-9, ID-Conf about 64).", "",
             f"Evaluation: {metrics['items']} held-out 2-person items x {metrics['images_per_item']} images per "
             f"model, {metrics['steps']} sampler steps, the same noise for every model, scored by the judge; per "
             f"model {m0.get('references_scored')} (item, image, reference) entries and, for the base, "
             f"{m0.get('faces_scored')} faces found. Metrics x100 except face count and collision (fractions).", "",
             f"Runs: {len(ab.arms)} arms x {len(ab.seeds)} seeds {ab.seeds}, {tc.max_steps} steps each, batch "
             f"{tc.batch_size}, learning rate {tc.learning_rate}, LoRA rank {config.lora.rank}, T = "
             f"{tc.sampler_steps}, t in {tc.grad_step_range}. Mean ± 95% t-interval over the seeds.", "",
             "| model | " + " | ".join(LABELS[k] for k in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    lines.append("| base | " + " | ".join(_fmt(summary["table"][BASE][k]) for k in METRICS) + " |")
    for arm in ab.arms:
        row = summary["table"][arm]
        lines.append(f"| {ARM_TITLES[arm]} | " + " | ".join(_fmt(row[k]["mean"], row[k]["ci95"]) for k in METRICS)
                     + " |")
    lines += ["", "Pre-registered hypotheses (per-seed contrasts; holds = both 95% lower bounds above 0):", "",
              "| | contrast | estimate | paired t 95% lower | cluster bootstrap 95% | seeds | holds | power |",
              "|---|---|---|---|---|---|---|---|"]
    for name, h in summary["hypotheses"].items():
        pw = h["power"]
        lines.append(f"| {name} | {h['contrast']}, {LABELS[h['metric']]} | {h['estimate']:.2f} | "
                     f"{_fmt(h['t_lower95'])} | [{h['bootstrap_lower95']:.2f}, {h['bootstrap_upper95']:.2f}] | "
                     f"{h['seeds']} | {'**yes**' if h['holds'] else 'no'} | "
                     f"{pw['power'] if pw['power'] is not None else 'n/a'} (detectable ±{pw['detectable']}; "
                     f"80% needs {pw['seeds_for_80'] or 'n/a'} seeds) |")
    lines += ["", "Secondary measures:", "", "| arm | reward gain in training | judge ID-Sim gain over the base | "
              "ID-Conf - base's, images where both found 2 faces |", "|---|---|---|---|"]
    sec = summary["secondary"]
    for arm in ab.arms:
        rj = sec["reward_vs_judge"][arm]
        both = sec["id_conf_both_two_faces"][f"{arm} - {BASE}"]
        rg = rj["reward_gain"]
        lines.append(f"| {ARM_TITLES[arm]} | {_fmt(rg['mean'], rg['ci95']) if rg else 'n/a'} | "
                     f"{_fmt(rj['judge_id_sim_gain']['mean'], rj['judge_id_sim_gain']['ci95'])} | "
                     f"{_fmt(both['difference'], both['ci95'])} |")
    if "mimr - sir" in sec["id_conf_both_two_faces"]:
        both = sec["id_conf_both_two_faces"]["mimr - sir"]
        lines += ["", f"MIMR - SIR on ID-Conf over images where both found 2 faces: "
                      f"{_fmt(both['difference'], both['ci95'])} (t over seeds)."]
    if sec.get("exploratory"):
        lines += ["", "Exploratory contrasts, not pre-registered (the reward's part: one setting apart from SFT, "
                  "the same L_diff and steps); no claim rests on them:", "",
                  "| contrast | estimate | paired t 95% | cluster bootstrap 95% | seeds |", "|---|---|---|---|---|"]
        for name, c in sec["exploratory"].items():
            lines.append(f"| {name} | {c['estimate']:.2f} | {_fmt(c['estimate'], c['t_half_width'])} | "
                         f"[{c['bootstrap_lower95']:.2f}, {c['bootstrap_upper95']:.2f}] | {c['seeds']} |")
    total = sum(timings.values())
    lines += ["", "Wall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
              + f"; total {total / 60:.1f} min.", "",
              f"![the hypotheses' per-seed contrasts and intervals]({figures}/hypotheses.png)", "",
              f"![training curves]({figures}/training_curves.png)", "",
              f"![samples: references, base, SFT, SIR, MIMR (seed {ab.seeds[0]})]({figures}/samples.png)", "",
              END]
    return "\n".join(lines) + "\n"
