"""The tests' small toy world: its settings, where it is cached, and its build (also run as a script, so that
conftest can start it in the background while tests that do not need it run).

    python tests/toyworlds.py CACHE_DIR     # build (or reuse) the small world in CACHE_DIR/toy-world-small
    python tests/toyworlds.py --refresh     # build it from scratch and keep its models in tests/fixtures

Its trained models are kept in the repository (tests/fixtures/toy-world-small: the build's manifest and its
detector, embedders and judges, 6 MB): a cache left empty (a fresh clone, CI) starts from them, and the build
reuses each part whose cache key (settings, sources, library versions) and file hashes match. Training them takes
about 85 s on 2 fast cores and 7 minutes on slow ones, beside the tests. When the toy world's or the face
pipeline's sources change, the keys differ: the build then trains those parts again (correct, slower), and
test_toyworld_build's freshness test fails until `make test-world` has refreshed the kept models.

A build holds an exclusive lock on CACHE_DIR/toy-world-small.lock, so the background build, the fixture and
another test session sharing the cache never write the same folder at once.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
NAME = "toy-world-small"
FIXTURE = ROOT / "tests" / "fixtures" / NAME  # the kept models (above); the raw collection is rebuilt (seconds)
KEPT = ("detector", "embedders", "second_judge")  # the trained parts

# Smaller than params.yaml's world (4 min), measured held-out: detector P/R 0.99/1.0, landmark error
# 3.5 px; TAR@FAR1e-3 0.80 (reward) and 0.82 (judge), score correlation 0.71. The second judge (a MobileFaceNet
# on 200 people past the pool; about 60 s) needs more, smaller steps at this size: TAR 0.75, correlation with the
# judge 0.62 (batch 64 at lr 3e-3: 0.42).
SMALL_WORLD = {
    "n_identities": 260, "n_train_identities": 200, "faces_per_identity": 6, "test_faces_per_identity": 5,
    "collection": {"n_groups": 6, "images_per_group": [4, 8], "cast_size": [2, 4]},
    "detector": {"steps": 250, "n_scenes": 600, "lr": 0.004},
    "reward": {"arch": "toy_r10", "epochs": 5, "seed": 1, "batch": 64},
    "judge": {"arch": "toy_r10", "num_features": 64, "epochs": 5, "seed": 2, "batch": 64},
    "second_judge": {"arch": "toy_mbf", "num_features": 64, "epochs": 5, "seed": 3, "batch": 32, "lr": 0.01,
                     "identities": [260, 460]},
    "quality": {"eval_scenes": 100, "min_precision": 0.9, "min_recall": 0.9, "min_tar": 0.6},
}


def cache_dir() -> Path:
    """.cache at the repository root, or $UMO_TEST_CACHE."""
    return Path(os.environ.get("UMO_TEST_CACHE", ROOT / ".cache"))


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (released when the holder exits, even if it is killed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def build_small_world(cache: Path, *, from_kept: bool = True):
    """The small world (umo.toy.world.build.BuildResult), built or reused in cache/toy-world-small; an empty cache
    starts from the kept models (FIXTURE) unless from_kept is False."""
    # heavy (torch, onnx, cv2 for the cache keys): loaded for a build, not whenever conftest is imported
    from umo.toy.world.build import build_toyworld

    with locked(cache / f"{NAME}.lock"):
        if from_kept and not (cache / NAME / "toyworld_build.json").is_file() and FIXTURE.is_dir():
            shutil.copytree(FIXTURE, cache / NAME, dirs_exist_ok=True)
        # 3 processes for its 3 trained parts (each single-threaded): on 2 cores they share the cores instead of
        # the third waiting for a free worker (the detector started at 70 s and ended the build at 150 s)
        return build_toyworld(cache / NAME, small_world_config(), workers=3)


def small_world_config():
    from umo.toy.config import ToyWorldConfig
    from umo.typed import from_dict

    return from_dict(ToyWorldConfig, SMALL_WORLD, source="tests/toyworlds.py")


def stale_parts() -> list[str]:
    """The kept parts whose cache key no longer matches the sources, settings and versions of this checkout."""
    import json

    from umo.toy.world.build import part_keys

    kept = json.loads((FIXTURE / "toyworld_build.json").read_text())["parts"]
    keys = part_keys(small_world_config())
    return [name for name in KEPT if kept.get(name, {}).get("key") != keys[name]]


def refresh() -> None:
    """Build the small world from scratch and keep its trained models (not its raw collection) in FIXTURE."""
    with tempfile.TemporaryDirectory() as tmp:
        result = build_small_world(Path(tmp), from_kept=False)
        shutil.rmtree(FIXTURE, ignore_errors=True)
        shutil.copytree(result.world.root, FIXTURE, ignore=shutil.ignore_patterns("toy_raw", "toy_raw_truth.jsonl"))
    print(f"kept the small world's models in {FIXTURE}: commit them")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="The tests' small toy world: build it into CACHE (from the kept "
                                                 "models), or --refresh the kept models from scratch.")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("cache", nargs="?", type=Path, help="the folder to build the small world in")
    group.add_argument("--refresh", action="store_true",
                       help=f"retrain it and keep its trained models in {FIXTURE.relative_to(ROOT)}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.refresh:
        refresh()
        sys.exit(0)
    result = build_small_world(args.cache)
    print(f"small toy world in {result.world.root}: reused {', '.join(result.reused) or 'nothing'}; "
          f"seconds {result.seconds}")
