"""The face index of data prep: images/s of a first run, and the cost of a re-run after adding 10% new images.

On the toy world's raw collection (built or reused in --world): the collection minus a seeded 10% of its
images is indexed with an empty cache (first run), then the held-out images are added back and the index runs
again (incremental: only the new images are decoded, detected and embedded; the others are hashed and read
from the cache). Model loading is outside both timings; each run is repeated on fresh copies and the median is
reported. Target: incremental <= 15% of the first run.

Prints a table and writes JSON (benchmarks/results/prepare.json).
Run: `.venv/bin/python benchmarks/prepare.py [--world artifacts/toyworld] [--repeats 3]`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from umo.config import load_config
from umo.data.faces import FaceCache, index_collection
from umo.data.prepare import _load_models

TARGET_RATIO = 0.15
ROOT = Path(__file__).resolve().parents[1]


def split_collection(raw: Path, dst: Path, fraction: float, seed: int) -> tuple[Path, Path]:
    """Copy `raw` to dst/base with a seeded `fraction` of the images moved to dst/new (same group folders)."""
    base, new = dst / "base", dst / "new"
    shutil.copytree(raw, base)
    images = sorted(p for p in base.rglob("*.png"))
    held = np.random.default_rng(seed).choice(len(images), size=max(1, round(fraction * len(images))), replace=False)
    for i in sorted(held.tolist()):
        target = new / images[i].relative_to(base)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(images[i], target)
    return base, new


def add_back(base: Path, new: Path) -> int:
    moved = 0
    for p in sorted(new.rglob("*.png")):
        shutil.move(p, base / p.relative_to(new))
        moved += 1
    return moved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=Path, default=ROOT / "artifacts" / "toyworld")
    parser.add_argument("--fraction", type=float, default=0.10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prepare.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from umo.toy.world.build import build_toyworld

    base_cfg = load_config(ROOT / "params.yaml")
    world = build_toyworld(args.world, base_cfg.section("toyworld")).world
    config = load_config(ROOT / "params.yaml", world.faces_overrides())
    embedder, key = _load_models(config.faces, config.prepare.index_batch, "cpu")
    p = config.prepare
    first, incremental, sizes = [], [], {}
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            base, new = split_collection(world.raw, tmp / "raw", args.fraction, seed=r)
            cache = FaceCache(tmp / "cache", key)
            kw = dict(extensions=p.extensions, max_pixels=p.max_image_pixels, min_side=p.min_image_side, cache=cache,
                      embedder=embedder)
            t = time.perf_counter()
            _, _, c1 = index_collection(base, **kw)
            first.append(time.perf_counter() - t)
            sizes["new"] = add_back(base, new)
            t = time.perf_counter()
            _, _, c2 = index_collection(base, **kw)
            incremental.append(time.perf_counter() - t)
            sizes |= {"first_images": c1["computed"], "rerun_computed": c2["computed"], "rerun_cached": c2["cached"]}
    t_first, t_inc = statistics.median(first), statistics.median(incremental)
    ratio = t_inc / t_first
    result = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.machine()},
        "world": str(world.root), "images": sizes, "repeats": args.repeats,
        "first_run_s": round(t_first, 3), "first_run_images_per_s": round(sizes["first_images"] / t_first, 1),
        "incremental_s": round(t_inc, 3),
        "incremental_new_images_per_s": round(sizes["rerun_computed"] / t_inc, 1),
        "incremental_over_first": round(ratio, 4), "target": TARGET_RATIO, "met": ratio <= TARGET_RATIO,
        "runs": {"first_s": [round(v, 3) for v in first], "incremental_s": [round(v, 3) for v in incremental]},
    }
    print(f"{'run':<34}{'images':>8}{'seconds':>10}{'img/s':>9}")
    print(f"{'first (empty cache)':<34}{sizes['first_images']:>8}{t_first:>10.2f}{result['first_run_images_per_s']:>9.1f}")
    print(f"{'incremental (+10%: new / cached)':<34}{sizes['rerun_computed']:>4}/{sizes['rerun_cached']:<3}"
          f"{t_inc:>10.2f}{result['incremental_new_images_per_s']:>9.1f}")
    print(f"\nincremental / first = {ratio:.1%} (target <= {TARGET_RATIO:.0%}: {'met' if result['met'] else 'MISSED'})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
