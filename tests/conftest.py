"""Shared fixtures. `toy_world`: a small toy world (toy face models that work) for tests that need them.

It is built once (about 70 s on 2 cores) into .cache/toy-world-small at the repository root, or into
$UMO_TEST_CACHE, and reused by later runs through the build's own cache (keys cover the settings, the
sources and library versions, so a stale world is rebuilt, never used).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from umo.toy.config import ToyWorldConfig
from umo.typed import from_dict

ROOT = Path(__file__).resolve().parents[1]

# Smaller than params.yaml's world (4 min), measured held-out: detector P/R 0.99/1.0, landmark error
# 3.5 px; TAR@FAR1e-3 0.80 (reward) and 0.82 (judge), score correlation 0.71.
SMALL_WORLD = {
    "n_identities": 260, "n_train_identities": 200, "faces_per_identity": 6, "test_faces_per_identity": 5,
    "collection": {"n_groups": 6, "images_per_group": [4, 8], "cast_size": [2, 4]},
    "detector": {"steps": 250, "n_scenes": 600, "lr": 0.004},
    "reward": {"arch": "toy_r10", "epochs": 5, "seed": 1, "batch": 64},
    "judge": {"arch": "toy_r10", "num_features": 64, "epochs": 5, "seed": 2, "batch": 64},
    "quality": {"eval_scenes": 100, "min_precision": 0.9, "min_recall": 0.9, "min_tar": 0.6},
}


@pytest.fixture(scope="session")
def toy_world():
    """The small toy world (umo.toy.world.build.ToyWorld), built or reused."""
    from umo.toy.world.build import build_toyworld

    cache = Path(os.environ.get("UMO_TEST_CACHE", ROOT / ".cache")) / "toy-world-small"
    return build_toyworld(cache, from_dict(ToyWorldConfig, SMALL_WORLD, source="tests/conftest.py")).world


@pytest.fixture(scope="session")
def full_toy_world():
    """The toy world of params.yaml (the embedded default's), built (about 4.5 min on 2 cores) or reused from
    .cache/toy-world: for the quality numbers the issues set on THE toy world."""
    from umo.config import load_config
    from umo.toy.world.build import build_toyworld

    cache = Path(os.environ.get("UMO_TEST_CACHE", ROOT / ".cache")) / "toy-world"
    return build_toyworld(cache, load_config(ROOT / "params.yaml").section("toyworld")).world


@pytest.fixture(scope="session")
def tiny_generator_dir(tmp_path_factory):
    """A tiny seeded FLUX.2 [klein] pipeline folder written in the real diffusers layout (~1 s)."""
    from umo.toy.tiny.flux2 import write_tiny_flux2

    return write_tiny_flux2(tmp_path_factory.mktemp("generator") / "tiny_flux2")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite store, local artifacts); yields its URI."""
    from servers import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness: a temporary database behind a local API server for the session's flow runs."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
