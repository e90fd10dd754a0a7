"""Wall time of `umo toyworld build` with the params.yaml settings: a cold build, then a cached one.

The cold build goes to a fresh temporary folder (nothing reused); the second call on the same folder must
reuse every part. Prints a table (per part, total, cached) plus the held-out quality, and writes JSON
(benchmarks/results/toyworld_build.json). Target: the cold build <= 10 minutes on 2 cores.
Run: `.venv/bin/python benchmarks/toyworld_build.py [--params params.yaml] [--workers 2]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import tempfile
from pathlib import Path

from umo.config import load_config
from umo.toy.world.build import MANIFEST_FILE, build_toyworld, parts_of, quality_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "toyworld_build.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.params).section("toyworld")
    with tempfile.TemporaryDirectory(prefix="umo-toyworld-bench-") as tmp:
        cold = build_toyworld(Path(tmp) / "world", cfg, workers=args.workers)
        warm = build_toyworld(Path(tmp) / "world", cfg, workers=args.workers)
        manifest = json.loads((Path(tmp) / "world" / MANIFEST_FILE).read_text())
    # The model files' sha256, for comparing builds across machines (same pinned versions -> same bytes).
    models = {rel: digest for part in ("detector", "embedders", "second_judge") if part in manifest["parts"]
              for rel, digest in manifest["parts"][part]["files"].items()}
    manifest_sha = hashlib.sha256(json.dumps(manifest["parts"], sort_keys=True).encode()).hexdigest()
    assert cold.reused == () and set(warm.reused) == set(parts_of(cfg))
    rows = [(part, f"{sec:.1f}") for part, sec in cold.seconds.items()]
    rows.append(("cached rebuild", f"{warm.seconds['total']:.1f}"))
    print(f"{'toy world build (s)':<22}{'wall':>8}")
    for name, value in rows:
        print(f"{name:<22}{value:>8}")
    print()
    print(quality_table(cold.world.quality))
    result = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "workers": args.workers,
        "seconds": {k: round(v, 2) for k, v in cold.seconds.items()},
        "cached_seconds": round(warm.seconds["total"], 2),
        "target_seconds": 600,
        "quality": cold.world.quality,
        "model_sha256": models,
        "all_files_sha256": manifest_sha,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
