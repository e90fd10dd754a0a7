"""Judge scoring throughput: ours (each face embedded once) vs. the per-pair scheme of the public scripts.

Items of 3 references x 1 generated image with 3 faces, from the toy world's albums (3-person images as the
generated images, single-person images of the same people as the references; the few such items are cycled
to --items), the toy world's detector and judge.

- ours (`umo.eval.score`): ONE judge run for all faces of the batch (R + G embeddings), one similarity matrix
  per image;
- per pair (public style): for every (reference, face) pair both faces are aligned and embedded again, one
  judge call each (2 x R x G embeddings).

Scoring = alignment + embedding + similarities + metrics, from the same detections (the target, >= 3x).
Detection is timed apart, batched the same way for both, and an end-to-end speedup including it is reported
too: the toy detector costs about as much as the scoring, so end to end the gain is smaller.

Both produce the same ID-Sim (checked). Prints a table (median of repeats) and writes JSON
(benchmarks/results/eval.json). Run: `.venv/bin/python benchmarks/eval.py`.

`--held-out`: the whole `umo evaluate` of the held-out set (base and candidate generate, the judges score,
the report is written), this checkout against the code of `--baseline` (default: the commit before Sim(GT),
copy-paste, the matching pictures and the second judge came in), on the same generator, LoRA, manifest and face
models, in alternating runs; each code reads its own params.yaml's defaults. Target: at most 1.2x the
baseline's time. Writes benchmarks/results/eval_heldout.json. Needs the chain's artifacts (`make run`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from umo.config import load_config
from umo.eval.score import Judge, largest_only, score_item
from umo.faces.types import Detections

ROOT = Path(__file__).resolve().parents[1]
TARGET = 3.0


def load_items(world, n_items: int):
    truth = [json.loads(line) for line in world.truth.read_text().splitlines()]
    three = [t for t in truth if len(t["identity_ids"]) == 3][:n_items]
    solo = {}
    for t in truth:
        if len(t["identity_ids"]) == 1:
            solo.setdefault(t["identity_ids"][0], t)
    read = lambda t: np.asarray(Image.open(world.raw / t["group"] / t["image"]).convert("RGB"))  # noqa: E731
    items = []
    for t in three:
        refs = [read(solo[i]) for i in t["identity_ids"] if i in solo]
        if len(refs) == 3:
            items.append((refs, read(t)))
    return items


def detect(judge: Judge, items):
    return judge.detect([r for refs, _ in items for r in refs]), judge.detect([g for _, g in items])


def ours(judge: Judge, items, dets):
    """Every face of the batch in one judge call (the references' largest faces), then one matrix per image."""
    ref_dets, gen_dets = dets
    refs = [r for refs, _ in items for r in refs]
    emb = judge.embed(refs + [g for _, g in items], [largest_only(d) for d in ref_dets] + list(gen_dets))
    ref_emb = np.concatenate(emb[:len(refs)])
    gen_emb = emb[len(refs):]
    return [score_item(str(k), ref_emb[3 * k:3 * k + 3], [gen_emb[k]]) for k in range(len(items))]


def per_pair(judge: Judge, items, dets):
    """The public scripts' scheme: both faces re-embedded for every (reference, face) pair."""
    ref_dets, gen_dets = dets
    out = []
    for k, (refs, gen) in enumerate(items):
        gen_det = gen_dets[k]
        sim = np.zeros((len(refs), len(gen_det)))
        for r, img in enumerate(refs):
            one = largest_only(ref_dets[3 * k + r])
            for j in range(len(gen_det)):
                (a,) = judge.recognizer.embed([img], [one])
                face = Detections(gen_det.boxes[j:j + 1], gen_det.landmarks[j:j + 1], gen_det.scores[j:j + 1])
                (g,) = judge.recognizer.embed([gen], [face])
                sim[r, j] = float(a[0] @ g[0])
        out.append(score_item(str(k), np.eye(len(refs)), [sim.T]))  # scores from the same matrix
    return out


BASELINE = "0f973ec"  # the evaluation before Sim(GT), copy-paste, the matching pictures and the second judge
HELD_OUT_TARGET = 1.2


def held_out(args: argparse.Namespace) -> None:
    """Wall time of `umo evaluate` on the held-out set: this checkout vs the baseline commit's code."""
    import subprocess
    import sys
    import tempfile

    lora = ROOT / "artifacts" / "train" / "lora"
    if not lora.is_dir():
        raise SystemExit(f"{lora}: no trained LoRA; run `make run` first")
    with tempfile.TemporaryDirectory(prefix="umo-bench-") as tmp:
        tmp = Path(tmp)
        base = tmp / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), args.baseline], cwd=ROOT, check=True)
        (base / "artifacts").symlink_to(ROOT / "artifacts")  # the same generator, LoRA, manifest and face models
        try:
            codes = {"baseline": base, "this checkout": ROOT}
            seconds: dict[str, list[float]] = {name: [] for name in codes}
            for k in range(args.repeats):
                for name, code in codes.items():
                    out = tmp / f"report-{k}-{name.replace(' ', '_')}"
                    cmd = [sys.executable, "-m", "umo.cli", "evaluate", "--params", str(code / "params.yaml"),
                           "--lora", str(lora), "--out", str(out)]
                    if args.max_items:
                        cmd += ["-S", f"eval.max_items={args.max_items}"]
                    t = time.perf_counter()
                    # run in the code's own folder: `python -m` puts it first on sys.path (before the editable
                    # install's umo)
                    done = subprocess.run(cmd, cwd=code, capture_output=True, text=True)
                    seconds[name].append(time.perf_counter() - t)
                    if done.returncode:
                        raise SystemExit(f"{name}: `{' '.join(cmd)}` exited {done.returncode}:\n{done.stderr[-3000:]}")
                    print(f"run {k + 1}/{args.repeats} {name}: {seconds[name][-1]:.1f} s", flush=True)
            metrics = json.loads(out.joinpath("metrics.json").read_text())
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    old, new = statistics.median(seconds["baseline"]), statistics.median(seconds["this checkout"])
    ratio = new / old
    result = {"machine": {"cpus": os.cpu_count(), "processor": platform.machine()}, "baseline": args.baseline,
              "items": metrics["candidate"]["items"] + metrics["candidate"]["unscored"],
              "images_per_item": metrics["images_per_item"], "judges": list(metrics.get("judges", {})),
              "repeats": args.repeats, "seconds": {k: [round(v, 2) for v in vs] for k, vs in seconds.items()},
              "baseline_s": round(old, 2), "this_checkout_s": round(new, 2), "ratio": round(ratio, 3),
              "target": HELD_OUT_TARGET, "met": ratio <= HELD_OUT_TARGET}
    print(f"\n{'umo evaluate, held-out set':<34}{'seconds (median)':>18}")
    print(f"{'baseline ' + args.baseline:<34}{old:>18.1f}")
    print(f"{'this checkout':<34}{new:>18.1f}")
    print(f"\n{result['items']} items x {result['images_per_item']} images x 2 models, judges {result['judges']}: "
          f"{ratio:.2f}x the baseline (target <= {HELD_OUT_TARGET}x: {'met' if result['met'] else 'MISSED'})")
    path = args.out.with_name("eval_heldout.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--held-out", action="store_true", help="time `umo evaluate` on the held-out set against "
                        "--baseline's code (see the module docstring)")
    parser.add_argument("--baseline", default=BASELINE, help="the commit to compare with (default: %(default)s)")
    parser.add_argument("--max-items", type=int, default=None, help="--held-out: the first N items only")
    parser.add_argument("--world", type=Path, default=ROOT / "artifacts" / "toyworld")
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eval.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.held_out:
        return held_out(args)
    from umo.toy.world.build import build_toyworld

    world = build_toyworld(args.world, load_config(ROOT / "params.yaml").section("toyworld")).world
    config = load_config(ROOT / "params.yaml", world.faces_overrides())
    judge = Judge.from_config(config.faces)
    found = load_items(world, args.items)
    items = [found[k % len(found)] for k in range(args.items)]
    warm = detect(judge, items[:2])
    ours(judge, items[:2], warm), per_pair(judge, items[:2], warm)  # warm-up
    t_det, t_ours, t_pair = [], [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        dets = detect(judge, items)
        t_det.append(time.perf_counter() - t)
        t = time.perf_counter()
        scores = ours(judge, items, dets)
        t_ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        public = per_pair(judge, items, dets)
        t_pair.append(time.perf_counter() - t)
    for s, p in zip(scores, public):  # the same numbers both ways
        assert abs(s.images[0].id_sim - p.images[0].id_sim) < 1e-4, (s, p)
    d, a, b = statistics.median(t_det), statistics.median(t_ours), statistics.median(t_pair)
    speedup, end_to_end = b / a, (d + b) / (d + a)
    result = {"machine": {"cpus": os.cpu_count(), "processor": platform.machine()}, "items": len(items),
              "distinct_items": len(found), "references_per_item": 3, "faces_per_image": 3,
              "repeats": args.repeats, "detect_s": round(d, 4), "ours_scoring_s": round(a, 4),
              "per_pair_scoring_s": round(b, 4), "scoring_speedup": round(speedup, 2),
              "end_to_end_speedup": round(end_to_end, 2), "target": TARGET, "met": speedup >= TARGET}
    print(f"{'stage':<36}{'seconds':>10}{'items/s':>10}")
    print(f"{'detection (shared, batched)':<36}{d:>10.3f}{len(items) / d:>10.1f}")
    print(f"{'scoring, ours (each face once)':<36}{a:>10.3f}{len(items) / a:>10.1f}")
    print(f"{'scoring, per pair (public scripts)':<36}{b:>10.3f}{len(items) / b:>10.1f}")
    print(f"\nscoring speedup {speedup:.2f}x (target >= {TARGET:.0f}x: {'met' if result['met'] else 'MISSED'}); "
          f"end to end with detection {end_to_end:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
