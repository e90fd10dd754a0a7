"""Judge scoring throughput: ours (each face embedded once) vs. the per-pair scheme of the public scripts.

Items of 3 references x 1 generated image with 3 faces, from the toy world's albums (3-person images as the
generated images, single-person images as the references), the toy world's detector and judge.

- ours (`umo.eval.score`): one detector call per batch of images, ONE judge run for all faces of the batch
  (R + G embeddings), one similarity matrix per image;
- per pair (public style): the same detections, then for every (reference, face) pair both faces are aligned
  and embedded again, one judge call each (2 x R x G embeddings).

Both produce the same similarity matrices (checked). Prints a table (median of repeats) and writes JSON
(benchmarks/results/eval.json). Target: ours >= 3x faster. Run: `.venv/bin/python benchmarks/eval.py`.
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
from umo.eval.score import Judge, largest_face, score_item
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


def ours(judge: Judge, items):
    refs, missing = judge.references([r for refs, _ in items for r in refs])
    gen = judge.faces([g for _, g in items])
    return [score_item(str(k), refs[3 * k:3 * k + 3], [gen[k][1]]) for k in range(len(items))]


def per_pair(judge: Judge, items):
    """The public scripts' scheme: detections once per image, both faces re-embedded for every pair."""
    out = []
    for refs, gen in items:
        ref_dets = judge.detector.detect(refs)
        (gen_det,) = judge.detector.detect([gen])
        sim = np.zeros((len(refs), len(gen_det)))
        for r, (img, det) in enumerate(zip(refs, ref_dets)):
            k = largest_face(det.boxes)
            one = Detections(det.boxes[k:k + 1], det.landmarks[k:k + 1], det.scores[k:k + 1])
            for j in range(len(gen_det)):
                (a,) = judge.recognizer.embed([img], [one])
                face = Detections(gen_det.boxes[j:j + 1], gen_det.landmarks[j:j + 1], gen_det.scores[j:j + 1])
                (b,) = judge.recognizer.embed([gen], [face])
                sim[r, j] = float(a[0] @ b[0])
        out.append(sim)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=Path, default=ROOT / "artifacts" / "toyworld")
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eval.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from umo.toyworld.build import build_toyworld

    world = build_toyworld(args.world, load_config(ROOT / "params.yaml").toyworld).world
    config = load_config(ROOT / "params.yaml", world.faces_overrides())
    judge = Judge.from_config(config.faces)
    items = load_items(world, args.items)
    ours(judge, items[:2]), per_pair(judge, items[:2])  # warm-up
    t_ours, t_pair = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        scores = ours(judge, items)
        t_ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        sims = per_pair(judge, items)
        t_pair.append(time.perf_counter() - t)
    # same numbers both ways: ID-Sim of each item from the per-pair matrices
    for s, sim in zip(scores, sims):
        assert abs(s.images[0].id_sim - float(sim.max(axis=1).mean())) < 1e-4, (s, sim)
    a, b = statistics.median(t_ours), statistics.median(t_pair)
    result = {"machine": {"cpus": os.cpu_count(), "processor": platform.machine()}, "items": len(items),
              "references_per_item": 3, "faces_per_image": 3, "repeats": args.repeats,
              "ours_s": round(a, 4), "per_pair_s": round(b, 4), "ours_items_per_s": round(len(items) / a, 1),
              "per_pair_items_per_s": round(len(items) / b, 1), "speedup": round(b / a, 2), "target": TARGET,
              "met": b / a >= TARGET}
    print(f"{'scheme':<28}{'seconds':>10}{'items/s':>10}")
    print(f"{'ours (each face once)':<28}{a:>10.3f}{len(items) / a:>10.1f}")
    print(f"{'per pair (public scripts)':<28}{b:>10.3f}{len(items) / b:>10.1f}")
    print(f"\nspeedup {b / a:.2f}x (target >= {TARGET:.0f}x: {'met' if result['met'] else 'MISSED'})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
