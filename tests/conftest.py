"""Shared fixtures. `toy_world`: a small toy world (toy face models that work) for tests that need them;
`default_raw`: THE toy world's raw collection (params.yaml's: the embedded default's data/).

The small world (tests/toyworlds.py) is built once (about 85 s on 2 cores) into .cache/toy-world-small at the
repository root, or into $UMO_TEST_CACHE, and reused by later runs through the build's own cache (keys cover
the settings, the sources and library versions, so a stale world is rebuilt, never used). So that a fresh
clone does not wait for it, the build starts in a background process as soon as the tests are collected, and
the test modules that do not use the world run first (each module whole, in its order): on a fresh clone the
build overlaps with them (measured: 46 s less on 2 cores). The `toy_world` fixture waits for that process,
then loads the world (a build of its own if the background one failed, which then reports why).

`make test` runs the modules on every core with pytest-xdist (`-n`, each module whole on one worker, in the
order below): the chain's module, the longest by far, starts first and runs beside all the others. Each worker
gets its share of the cores for torch and for the processes it starts (OMP_NUM_THREADS).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from toyworlds import NAME, build_small_world, cache_dir

ROOT = Path(__file__).resolve().parents[1]
FIRST = ("tests/test_chain.py",)  # the longest modules (minutes): first, to run beside all the rest
# Then, in each group, the longer modules first (seconds of a whole-suite run, 2 workers): the worker that ends
# last ends with a short module, not with a minute of one while the other worker idles.
LONGER = ("tests/test_flows.py", "tests/test_registry_deploy.py", "tests/test_prepare.py", "tests/test_train_loop.py",
          "tests/test_toyworld_build.py", "tests/test_eval_run.py", "tests/test_qwen_image.py", "tests/test_video.py",
          "tests/test_train_sharded.py", "tests/test_train_resume.py", "tests/test_deploy_s3.py",
          "tests/test_gate_evidence.py", "tests/test_default_data.py", "tests/test_flux2_dev.py")
WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ... under pytest-xdist; None in a plain session
if WORKER is not None:
    _share = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # read by torch on import, and by the stages it starts
        os.environ.setdefault(_var, str(_share))
_background: dict[str, subprocess.Popen] = {}


def pytest_configure(config: pytest.Config) -> None:
    # Prefect's server models (imported here by its test harness) make SQLAlchemy warn about their types each
    # time an in-process MLflow store configures its mappers: noise of the two libraries in one process.
    config.addinivalue_line("filterwarnings", r"ignore:Type object <class 'prefect\.server\.:DeprecationWarning")


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: only the tests that will run count
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """FIRST, then the modules that never use the small toy world, then the others, the LONGER ones first in each
    group, each module whole and in its order; and when a collected test needs the world, its build starts now,
    in the background (under xdist, in the first worker only: the others wait for it on the cache's lock)."""
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    needs = {m: any("toy_world" in getattr(i, "fixturenames", ()) for i in its) for m, its in modules.items()}
    order = sorted(modules.items(), key=lambda kv: (kv[0] not in FIRST, needs[kv[0]],
                                                    LONGER.index(kv[0]) if kv[0] in LONGER else len(LONGER)))
    items[:] = [i for _, its in order for i in its]
    if any(needs.values()) and not config.option.collectonly and "toy_world" not in _background \
            and WORKER in (None, "gw0"):
        cache = cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        with open(cache / f"{NAME}.log", "wb") as log:
            _background["toy_world"] = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("toyworlds.py")), str(cache)], cwd=ROOT,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def pytest_unconfigure(config: pytest.Config) -> None:
    """A background build still running (the session was interrupted, or stopped early by -x) is stopped: its
    process group (it and its build processes), by the id of the group this session started."""
    for proc in _background.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="session")
def toy_world():
    """The small toy world (umo.toy.world.build.ToyWorld): the background build's, or built here."""
    proc = _background.get("toy_world")
    if proc is not None:
        proc.wait()  # its log: <cache>/toy-world-small.log; a failure is reported by the build below
    return build_small_world(cache_dir()).world


@pytest.fixture(scope="session")
def default_raw(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, truth.jsonl): THE toy world's raw collection, as `umo toyworld raw` writes it from params.yaml
    (48 photo sessions of 2-3 of 16 held-out ids, 374 images; ~7 s) for the embedded default's data/, and its
    ground truth. Written once: test_default_data checks it against data.dvc, test_prepare clusters it."""
    out = tmp_path_factory.mktemp("default-raw")
    done = subprocess.run([Path(sys.executable).parent / "umo", "toyworld", "raw", "--params", ROOT / "params.yaml",
                           "--out", out / "data", "--truth", out / "truth.jsonl"], cwd=out, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "data", out / "truth.jsonl"


@pytest.fixture(scope="session")
def tiny_generator_dir(tmp_path_factory):
    """A tiny seeded FLUX.2 [klein] pipeline folder written in the real diffusers layout (~1 s)."""
    from umo.toy.tiny.flux2 import write_tiny_flux2

    return write_tiny_flux2(tmp_path_factory.mktemp("generator") / "tiny_flux2")


@pytest.fixture(scope="session")
def mlflow_service(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite store, local artifacts), one for the session (each test module
    keeps to its own model names); yields the servers.MlflowServer (restartable on its port and store)."""
    from servers import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server(mlflow_service) -> str:
    """The session's `mlflow server` (mlflow_service): its URI."""
    return mlflow_service.uri


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness: a temporary database behind a local API server for the session's flow runs."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
