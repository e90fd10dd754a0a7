"""The evaluation report: one folder a person, DVC, the approval gate and the MLflow run all read.

    out/metrics.json          DVC metrics: per model the set metrics (umo.eval.score.aggregate), deltas vs the
                              base (and vs the champion), the toy-world flag and the settings: the gate's judge
                              (the first of faces.judges); every judge's under `judges`; the set evaluated
                              (`dataset`: path, digest, items, its first item as an example)
    out/report.md             base | candidate | delta (| champion | delta) tables, overall and per number of people
    out/scores.jsonl          one line per item and model: every image's scores and seeds
    out/plots/by_identities.json  DVC plots: per number of people, <model>_<metric> for ID-Sim, ID-Conf,
                                  face-count accuracy and collapse rate
    out/plots/items.json          DVC plots: per item ID-Sim of base and candidate, sorted by the change
    out/by_identities.png     the by-people metrics drawn against the number of people (sets of 2 or more sizes)
    out/grids/improved-<k>-<item>.png, regressed-<k>-<item>.png
                              references | base | candidate (| champion) for the items whose ID-Sim rose most
                              and fell most (candidate vs base)
    out/images/<model>/<item>.png   every generated grid (XVerseBench output format: 2x2 for 4 images)
    out/matching/<model>/<item>.png the same grid, each image with the judge's faces boxed and the Hungarian
                                    pairs drawn to the reference thumbnails, with their similarities

Built in a temporary sibling and renamed (umo.io.atomic_dir): a reader sees the old report or the new one.
MLflow logging belongs to the caller that owns the run (`umo.tracking`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from umo.config import EvalConfig, FacesConfig
from umo.data.manifest import read_manifest
from umo.eval.score import PAIRED_KEYS, SCALES, ItemScore, aggregate, paired_interval
from umo.eval.sets import EvalItem, file_stem
from umo.eval.matching import matching_picture
from umo.images import decode_rgb, from_grid, to_grid
from umo.io import atomic_dir, dataset_record, is_toy_world, sha256_file

BASE, CANDIDATE, CHAMPION = "base", "candidate", "champion"
JUDGE_PAIRED = ("id_sim", "id_conf")  # every judge's paired intervals (the gate's judge: all of PAIRED_KEYS)
BY_IDENTITIES = ("id_sim", "id_conf", "face_count_accuracy", "collision_rate")  # per number of people
MATCHING_HEIGHT = 192  # px of each generated image in the pictures of the matching
METRICS = [("id_sim", "ID-Sim"), ("id_conf", "ID-Conf"), ("id_match", "ID-Match"),
           ("face_count_accuracy", "Face-count acc."), ("collision_rate", "Collapse rate"),
           ("sim_gt", "Sim(GT)"), ("copy_paste", "Copy-paste"), ("items", "Items scored"),
           ("unscored", "Items unscored"), ("images_scored", "Images scored"), ("faces_scored", "Faces found (judge)"),
           ("references_scored", "References scored"), ("gt_images_measured", "Images measured vs ground truth")]


def delta(new: dict, old: dict) -> dict:
    """Metric differences new - old (None where either side has no value), per number of people too.

    >>> delta({"id_sim": 50.0, "id_conf": None, "by_identities": {"2": {"id_sim": 40.0}}},
    ...       {"id_sim": 45.5, "id_conf": 3.0, "by_identities": {"2": {"id_sim": 41.0}}})
    {'id_sim': 4.5, 'id_conf': None, 'by_identities': {'2': {'id_sim': -1.0}}}
    """
    def diff(a: dict, b: dict) -> dict:
        return {k: None if a.get(k) is None or b.get(k) is None else round(a[k] - b[k], 4)
                for k in a if k not in ("by_identities", "scale")}

    out = diff(new, old)
    out["by_identities"] = {n: diff(v, old.get("by_identities", {}).get(n, {}))
                            for n, v in new.get("by_identities", {}).items()}
    return out


def write_report(out: Path, settings: EvalConfig, faces: FacesConfig, items: list[EvalItem],
                 judged: dict[str, dict[str, list[ItemScore]]], *, images: Path, models: dict[str, Path | None],
                 left_out: dict[str, int] | None = None) -> dict[str, Any]:
    """Write the report folder (see the module docstring) and return metrics.json's content. judged: per judge
    (the first decides the gate), per model, the item scores."""
    cfg = settings
    scale = SCALES[cfg.benchmark]
    gate_judge = next(iter(judged))
    scores = judged[gate_judge]
    results = {name: aggregate(s, scale) for name, s in scores.items()}
    metrics: dict[str, Any] = {"benchmark": cfg.benchmark, "toy_world": _toy_world(settings, faces),
                               "images_per_item": cfg.images_per_item, "steps": cfg.steps, "seed": cfg.seed,
                               "items_left_out": dict(sorted((left_out or {}).items())),
                               **results, "delta": delta(results[CANDIDATE], results[BASE])}
    if CHAMPION in results:
        metrics["delta_vs_champion"] = delta(results[CANDIDATE], results[CHAMPION])
    # The gate decides on these (registry.gate.use_intervals): the sampling error of each difference, from the
    # items the models share. 95%, 2000 resamples, seeded: the same scores give the same interval.
    metrics["paired"] = {f"{CANDIDATE} - {other}": {key: paired_interval(scores[CANDIDATE], scores[other], key,
                                                                          scale=scale) for key in PAIRED_KEYS}
                         for other in (BASE, CHAMPION) if other in scores}
    # the set the numbers are on (logged as the evaluation dataset, and its first item as the served model's
    # input example)
    metrics["dataset"] = dataset_record(cfg.benchmark, cfg.path, items=len(items)) | {
        "example": {"prompt": items[0].prompt, "references": [str(p) for p in items[0].references]}}
    metrics["models"] = {name: None if path is None else {"path": str(path), "sha256": sha256_file(path)}
                         for name, path in models.items()}
    # Every judge's view (the gate's judge is the first, whose numbers are also the top-level ones above).
    metrics["gate_judge"] = gate_judge
    metrics["judges"] = {gate_judge: {**results, "paired": metrics["paired"]}}
    for judge, by_model in list(judged.items())[1:]:
        metrics["judges"][judge] = {name: aggregate(s, scale) for name, s in by_model.items()} | {
            "paired": {f"{CANDIDATE} - {other}": {key: paired_interval(by_model[CANDIDATE], by_model[other], key,
                                                                      scale=scale) for key in JUDGE_PAIRED}
                       for other in (BASE, CHAMPION) if other in by_model}}
    changes = _item_changes(scores)
    with atomic_dir(out) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (tmp / "report.md").write_text(_markdown(metrics, list(scores), changes))
        with open(tmp / "scores.jsonl", "w") as f:
            for name, item_scores in scores.items():
                for s in item_scores:
                    f.write(json.dumps({"model": name, **asdict(s)}) + "\n")
        (tmp / "plots").mkdir()
        sizes = sorted({int(n) for r in results.values() for n in r["by_identities"]})
        (tmp / "plots" / "by_identities.json").write_text(json.dumps(
            [{"identities": n, **{f"{name}_{key}": r["by_identities"].get(str(n), {}).get(key)
                                  for name, r in results.items() for key in BY_IDENTITIES}}
             for n in sizes], indent=1))
        if len(sizes) > 1:
            _by_identities_figure(tmp / "by_identities.png", results, sizes, metrics["benchmark"])
        (tmp / "plots" / "items.json").write_text(json.dumps(
            [{"rank": k, "item": item, "base": b, "candidate": c, "change": round(c - b, 6)}
             for k, (item, b, c) in enumerate(changes)], indent=1))
        if images.is_dir():
            shutil.copytree(images, tmp / "images")
            _matching_pictures(tmp, items, scores, cfg.images_per_item)
        by_id = {i.id: i for i in items}
        picks = _picks(changes, cfg.report_items)
        if picks:
            (tmp / "grids").mkdir()
        for label, k, item_id in picks:
            _comparison(tmp / "grids" / f"{label}-{k}-{file_stem(item_id)}.png", by_id[item_id], list(scores),
                        tmp / "images", cfg.images_per_item)
    return metrics


def _matching_pictures(out: Path, items: list[EvalItem], scores: dict[str, list[ItemScore]], n: int) -> None:
    """out/matching/<model>/<item>.png: each generated image of the item's grid with its faces boxed and the
    Hungarian pairs drawn to the reference thumbnails (umo.eval.matching), in the grid's layout."""
    by_id = {i.id: i for i in items}
    thumbs: dict[str, list[np.ndarray]] = {}
    for name, item_scores in scores.items():
        (out / "matching" / name).mkdir(parents=True)
        for score in item_scores:
            grid = out / "images" / name / f"{file_stem(score.item)}.png"
            if score.unscored is not None or not grid.is_file() or any(s.sims is None for s in score.images):
                continue
            item = by_id[score.item]
            people = score.people if score.people is not None else list(item.identities)
            if score.item not in thumbs:
                thumbs[score.item] = [decode_rgb(item.references[k], max_pixels=None)[0] for k in people]
            generated = from_grid(np.asarray(Image.open(grid).convert("RGB")), n)
            pictures = [matching_picture(img, np.asarray(s.boxes).reshape(-1, 4), np.asarray(s.sims).reshape(
                len(people), -1), thumbs[score.item], height=MATCHING_HEIGHT) for img, s in zip(generated, score.images)]
            # fast zlib: a third of the default level's time (measured: 21 vs 59 ms a picture), 20% more bytes
            Image.fromarray(to_grid(pictures)).save(out / "matching" / name / f"{file_stem(score.item)}.png",
                                                    compress_level=1)


def _by_identities_figure(path: Path, results: dict[str, dict], sizes: list[int], benchmark: str) -> None:
    """One PNG: ID-Sim, ID-Conf, face-count accuracy and collapse rate against the number of people, a line per
    model (a point missing where a model has no value at that size)."""
    import matplotlib  # lazy: pyplot must load after the Agg backend is chosen, and only a report draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above

    labels = dict(METRICS)
    fig, axes = plt.subplots(1, len(BY_IDENTITIES), figsize=(3.6 * len(BY_IDENTITIES), 3.0))
    for ax, key in zip(axes, BY_IDENTITIES):
        for name, r in results.items():
            ys = [r["by_identities"].get(str(n), {}).get(key) for n in sizes]
            ax.plot(sizes, [np.nan if y is None else y for y in ys], marker="o", label=name)
        ax.set_title(labels[key])
        ax.set_xlabel("people per item")
        ax.set_xticks(sizes)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{benchmark}: by number of people (the gate's judge)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _toy_world(settings: EvalConfig, faces: FacesConfig) -> bool:
    """True when the judge is a toy-world model (its pack folder says so) or the held-out set is toy data."""
    if any(is_toy_world(Path(j.root) / (j.pack or "")) for j in faces.judges):
        return True
    if settings.benchmark == "heldout":
        return bool(read_manifest(settings.path).toy_world)
    return False


def _item_changes(scores: dict[str, list[ItemScore]]) -> list[tuple[str, float, float]]:
    """(item, base ID-Sim, candidate ID-Sim) of every item both scored, the most improved first (unscaled)."""
    rows = []
    for b, c in zip(scores[BASE], scores[CANDIDATE]):
        if b.unscored is None and c.unscored is None and b.images and c.images:
            rows.append((b.item, b.mean("id_sim"), c.mean("id_sim")))
    return sorted(rows, key=lambda r: (r[1] - r[2], r[0]))


def _picks(changes: list[tuple[str, float, float]], n: int) -> list[tuple[str, int, str]]:
    """The n most improved items (change > 0) and the n most regressed (change < 0), never one item twice."""
    up = [item for item, b, c in changes if c > b][:n]
    down = [item for item, b, c in reversed(changes) if c < b and item not in up][:n]
    return [("improved", k + 1, i) for k, i in enumerate(up)] + [("regressed", k + 1, i) for k, i in enumerate(down)]


def _fmt(v: Any) -> str:
    if v is None:
        return "not measured"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _signed(v: Any) -> str:
    return "–" if v is None else f"{v:+.4g}"


def _markdown(metrics: dict, models: list[str], changes: list[tuple[str, float, float]]) -> str:
    champion = CHAMPION in models
    scale = metrics[BASE]["scale"]
    lines = [f"# Evaluation: {metrics['benchmark']}", ""]
    if metrics["toy_world"]:
        lines += ["> **Toy world.** These numbers come from the offline synthetic world and tiny models; they say "
                  "that the chain works, not how good a model is.", ""]
    lines += [f"{metrics[BASE]['items'] + metrics[BASE]['unscored']} items, {metrics['images_per_item']} images "
              f"per item (seeds shared by every model), {metrics['steps']} sampler steps. ID-Sim, ID-Conf and "
              f"ID-Match x{scale:g}; face-count accuracy is the share of images with as many faces as people; "
              f"collapse rate, the share of images where two people's best faces are one face. Sim(GT) "
              f"(x{scale:g}) and copy-paste (-1: the face as the target shows the person, +1: the reference photo "
              f"pasted) compare with the ground-truth target, only in images whose faces, the target's and the "
              f"references are equally many.", ""]
    if metrics.get("items_left_out"):
        lines += [f"Not evaluated: {sum(metrics['items_left_out'].values())} items of the benchmark ("
                  + ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in metrics["items_left_out"].items())
                  + ").", ""]
    head = "| metric | base | candidate | Δ vs base |" + (" champion | Δ vs champion |" if champion else "")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for key, label in METRICS:
        row = [label, _fmt(metrics[BASE].get(key)), _fmt(metrics[CANDIDATE].get(key)),
               _signed(metrics["delta"].get(key))]
        if champion:
            row += [_fmt(metrics[CHAMPION].get(key)), _signed(metrics["delta_vs_champion"].get(key))]
        lines.append("| " + " | ".join(row) + " |")
    for pair, by_key in metrics.get("paired", {}).items():
        shown = [f"{label} {_signed(r['difference'])} [{_signed(r['lower'])}, {_signed(r['upper'])}]"
                 for key, label in METRICS if (r := by_key.get(key))]
        if shown:
            items = next(r["items"] for r in by_key.values() if r)
            lines += ["", f"{pair}, paired item bootstrap 95% ({items} items): " + "; ".join(shown) + "."]
    lines += _judges_markdown(metrics, models)
    labels = dict(METRICS)
    lines += ["", "## By number of people", "", "Base → candidate (Δ).", "",
              "| people | items | " + " | ".join(labels[k] for k in BY_IDENTITIES) + " |",
              "|---|---|" + "---|" * len(BY_IDENTITIES)]
    for n, cand in metrics[CANDIDATE]["by_identities"].items():
        base = metrics[BASE]["by_identities"].get(n, {})
        d = metrics["delta"]["by_identities"].get(n, {})
        cells = [f"{_fmt(base.get(k))} → {_fmt(cand.get(k))} ({_signed(d.get(k))})" for k in BY_IDENTITIES]
        lines.append(f"| {n} | {cand['items']} | " + " | ".join(cells) + " |")
    if changes:
        better = sum(c > b for _, b, c in changes)
        worse = sum(c < b for _, b, c in changes)
        lines += ["", f"Per item (ID-Sim, candidate vs base): {better} improved, {worse} regressed, "
                  f"{len(changes) - better - worse} unchanged. The most improved and most regressed are drawn in "
                  "`grids/` (references | base | candidate" + (" | champion" if champion else "") + ")."]
    return "\n".join(lines) + "\n"


def _judges_markdown(metrics: dict, models: list[str]) -> list[str]:
    """The judges section: each judge's ID-Sim and ID-Conf, base -> candidate with the paired interval."""
    judges = metrics.get("judges") or {}
    lines = ["", "## Judges", "",
             f"Scored by {len(judges)} judge{'s' if len(judges) != 1 else ''}, independent of the reward; **the gate "
             f"decides on the first, `{metrics['gate_judge']}`**. Base → candidate, Δ [paired 95%].", "",
             "| judge | ID-Sim | ID-Conf | faces found | references scored |", "|---|---|---|---|---|"]
    for judge, r in judges.items():
        pair = (r.get("paired") or {}).get(f"{CANDIDATE} - {BASE}") or {}
        cells = []
        for key in JUDGE_PAIRED:
            ci = pair.get(key)
            interval = f" [{_signed(ci['lower'])}, {_signed(ci['upper'])}]" if ci else ""
            cells.append(f"{_fmt(r[BASE].get(key))} → {_fmt(r[CANDIDATE].get(key))} "
                         f"({_signed(_minus(r[CANDIDATE].get(key), r[BASE].get(key)))}{interval})")
        counts = [f"{r[BASE]['faces_scored']} / {r[CANDIDATE]['faces_scored']}",
                  f"{r[BASE]['references_scored']} / {r[CANDIDATE]['references_scored']}"]
        lines.append(f"| `{judge}`" + (" (gate)" if judge == metrics["gate_judge"] else "") + " | "
                     + " | ".join(cells + counts) + " |")
    if len(judges) > 1:
        signs = {j: _sign(((r.get("paired") or {}).get(f"{CANDIDATE} - {BASE}") or {}).get("id_sim"))
                 for j, r in judges.items()}
        agree = len(set(signs.values())) == 1
        lines += ["", ("The judges agree" if agree else "**The judges disagree**") + " on the ID-Sim change: "
                  + ", ".join(f"`{j}` {s}" for j, s in signs.items()) + "."]
    return lines


def _minus(a: Any, b: Any) -> float | None:
    return None if a is None or b is None else round(a - b, 4)


def _sign(ci: dict | None) -> str:
    """What a paired interval shows: a rise or a fall (it excludes 0), or no change it can tell."""
    if not ci:
        return "not measured"
    return "up" if ci["lower"] > 0 else "down" if ci["upper"] < 0 else "no shown change"


def _comparison(path: Path, item: EvalItem, models: list[str], images: Path, n: int) -> None:
    """One PNG: a row of the item's reference images, then one row of images per model, each labelled."""
    rows = {name: from_grid(np.asarray(Image.open(images / name / f"{file_stem(item.id)}.png").convert("RGB")), n)
            for name in models}
    h, w = next(iter(rows.values()))[0].shape[:2]
    refs = [np.asarray(Image.fromarray(decode_rgb(p, max_pixels=None)[0]).resize((w, h))) for p in item.references]
    label_w, cols = 88, max(n, len(refs))
    sheet = Image.new("RGB", (label_w + cols * w, (len(models) + 1) * h), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, row) in enumerate([("references", refs), *rows.items()]):
        draw.text((4, r * h + h // 2 - 6), label, fill="black")
        for c, img in enumerate(row):
            sheet.paste(Image.fromarray(img), (label_w + c * w, r * h))
    sheet.save(path)
