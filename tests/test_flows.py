"""flows/umo_pipeline.py under Prefect's test harness, on a tiny DVC project whose stages are one-line scripts:
what is retried (a lost connection) and what is not (anything else), skipping by DVC's hashes, overrides; and
prefect.yaml's deployments on a real Prefect server, run by a real process worker."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from umo.config import ConfigError, load_config, write_overrides

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from flows.umo_pipeline import StageFailed, umo_pipeline  # noqa: E402

PY = sys.executable
# Each stage counts its attempts in <stage>.n, so the tests see how often DVC ran it.
COUNT = "import os,sys; f='{s}.n'; n=int(open(f).read()) if os.path.exists(f) else 0; open(f,'w').write(str(n+1)); "
STAGES = {
    "ok": COUNT.format(s="ok") + "open('ok.out','w').write('done'); print('made ok.out')",
    "flaky": COUNT.format(s="flaky") + (
        "print('mlflow.exceptions.MlflowException: API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/create '"
        "'failed with exception HTTPConnectionPool: Max retries exceeded (Caused by NewConnectionError: '"
        "'[Errno 111] Connection refused)') if n == 0 else open('flaky.out','w').write('done'); sys.exit(n == 0)"),
    "broken": COUNT.format(s="broken") + "print('ERROR umo.cli: data/x.json: not a manifest'); sys.exit(2)",
    "late": COUNT.format(s="late") + "print('ERROR: requests.exceptions.ConnectionError in a warning, then'); "
                                     "print('ValueError: lora rank must be positive'); sys.exit(1)",
}


@pytest.fixture(scope="module")
def initialized(tmp_path_factory):
    """A git + DVC project with params.yaml (the real one) and the stages above, initialized once (`dvc init` and
    `dvc config` are two interpreter starts): each test gets a fresh copy of it."""
    root = tmp_path_factory.mktemp("flows") / "project"
    root.mkdir()
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    stages = {name: {"cmd": f'{PY} -c "{code}"'} for name, code in STAGES.items()}
    for name in ("ok", "flaky"):
        stages[name]["outs"] = [f"{name}.out"]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, width=10_000))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([PY, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    subprocess.run([PY, "-m", "dvc", "config", "core.analytics", "false"], cwd=root, check=True)
    return root


@pytest.fixture
def project(initialized, tmp_path):
    """This test's own copy of the initialized project (nothing has run in it)."""
    return shutil.copytree(initialized, tmp_path / "project", symlinks=True)


def attempts(project: Path, stage: str) -> int:
    f = project / f"{stage}.n"
    return int(f.read_text()) if f.exists() else 0


def test_stages_run_then_skip_by_dvc_hashes(project, prefect_harness):
    assert umo_pipeline(stages=["ok"], project_dir=str(project)) == {"ok": "ran"}
    assert (project / "ok.out").read_text() == "done"
    assert umo_pipeline(stages=["ok"], project_dir=str(project)) == {"ok": "skipped"}
    assert attempts(project, "ok") == 1
    (project / "ok.out").write_text("tampered")  # an output that no longer hashes as dvc.lock says: run again
    assert umo_pipeline(stages=["ok"], project_dir=str(project)) == {"ok": "ran"}
    assert attempts(project, "ok") == 2


def test_connection_failure_is_retried(project, prefect_harness):
    result = umo_pipeline(stages=["flaky", "ok"], project_dir=str(project), retry_delay_seconds=0)
    assert result == {"ok": "ran", "flaky": "ran"}  # in dvc.yaml's order
    assert attempts(project, "flaky") == 2


def test_deterministic_failure_fails_at_once_with_its_output(project, prefect_harness):
    with pytest.raises(StageFailed) as err:
        umo_pipeline(stages=["broken"], project_dir=str(project), retry_delay_seconds=0)
    assert attempts(project, "broken") == 1
    assert not err.value.transient and err.value.returncode != 0
    assert "stage 'broken' failed with exit code" in str(err.value)
    assert "data/x.json: not a manifest" in str(err.value)  # the stage's own words, not only DVC's


def test_connection_words_before_the_real_error_still_count_as_transient_only_in_the_tail(project, prefect_harness):
    # The tail holds both lines here, so this one is retried: the rule is "the last lines show a connection
    # failure". Bounded by the task's retries (2): three attempts at most.
    with pytest.raises(StageFailed) as err:
        umo_pipeline(stages=["late"], project_dir=str(project), retry_delay_seconds=0)
    assert err.value.transient and attempts(project, "late") == 3


def test_unknown_stage_and_bad_override_fail_before_anything_runs(project, prefect_harness):
    with pytest.raises(ValueError, match=r"no stage 'trian'"):
        umo_pipeline(stages=["trian"], project_dir=str(project))
    before = (project / "params.yaml").read_text()
    with pytest.raises(ConfigError, match=r"train\.learning_rat"):
        umo_pipeline(stages=["ok"], overrides={"train.learning_rat": 1e-4}, project_dir=str(project))
    assert (project / "params.yaml").read_text() == before and attempts(project, "ok") == 0


def test_overrides_are_written_to_params_yaml_with_its_comments(project, prefect_harness):
    umo_pipeline(stages=["ok"], overrides={"train.learning_rate": 2e-4, "reward.kind": "sir"},
                 project_dir=str(project))
    text = (project / "params.yaml").read_text()
    config = load_config(project / "params.yaml")
    assert config.train.learning_rate == 2e-4 and config.reward.kind == "sir"
    assert "# mimr (multi-identity matching reward) or sir" in text  # comments survive the round trip
    original = (ROOT / "params.yaml").read_text().splitlines()
    changed = [a for a, b in zip(original, text.splitlines(), strict=True) if a != b]
    assert len(changed) == 2  # exactly the two lines, nothing else reformatted


def test_write_overrides_refuses_bad_values_and_leaves_the_file(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    before = params.read_text()
    with pytest.raises(ConfigError, match="train.mixed_precision"):
        write_overrides(params, ["train.mixed_precision=fp8"])
    assert params.read_text() == before


def test_evaluate_lora_registry_without_a_champion_is_a_clear_error(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = subprocess.run([PY, "-m", "umo.cli", "evaluate", "--lora", "registry", "-S", f"tracking.tracking_uri={store}"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "--lora registry: umo-flux2-klein-lora has no champion yet" in out.stderr


def api(server, path: str, body: dict | None = None):
    """The server's REST API, read directly (not through the Prefect client of this process)."""
    request = urllib.request.Request(f"{server.uri}/api{path}", data=json.dumps(body or {}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def test_prefect_server_worker_deploy_and_run(initialized, tmp_path):
    """`prefect deploy --all` of prefect.yaml against a real server; a process worker runs the on-demand
    deployment in a project (UMO_PROJECT_DIR: here the tiny one, with its `ok` stage) to completion; the worker
    is stopped by its PID, with its flow-run children."""
    from servers import PrefectServer, stop

    project = shutil.copytree(initialized, tmp_path / "project", symlinks=True)
    dvc_yaml = yaml.safe_load((project / "dvc.yaml").read_text())
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"ok": dvc_yaml["stages"]["ok"]}}, width=10_000))
    shutil.copy(ROOT / "prefect.yaml", project / "prefect.yaml")  # its entrypoints: flows/umo_pipeline.py
    shutil.copytree(ROOT / "flows", project / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    server = PrefectServer(tmp_path / "prefect").start()
    worker, children = None, []
    try:
        cli_env = server.env() | {"PATH": f"{Path(PY).parent}{os.pathsep}{os.environ['PATH']}"}
        prefect = [PY, "-m", "prefect", "--no-prompt"]
        for cmd in (["work-pool", "create", "umo-process", "--type", "process"], ["deploy", "--all"]):
            done = subprocess.run([*prefect, *cmd], cwd=project, env=cli_env, capture_output=True, text=True)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        deployments = {d["name"]: d for d in api(server, "/deployments/filter")}
        assert set(deployments) == {"nightly-retrain", "weekly-champion-reevaluation", "on-demand"}
        crons = {name: [s["schedule"]["cron"] for s in d["schedules"]] for name, d in deployments.items()}
        assert crons == {"nightly-retrain": ["0 2 * * *"], "weekly-champion-reevaluation": ["0 4 * * 0"],
                         "on-demand": []}
        assert all(d["work_pool_name"] == "umo-process" for d in deployments.values())
        # the checkout is the worker host's, resolved when the run starts there (not at deploy time)
        assert deployments["on-demand"]["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $UMO_PROJECT_DIR }}"}}]

        log = open(tmp_path / "worker.log", "wb")
        worker = subprocess.Popen([*prefect, "worker", "start", "--pool", "umo-process", "--limit", "1"],
                                  cwd=tmp_path, env=cli_env | {"UMO_PROJECT_DIR": str(project)},
                                  stdout=log, stderr=subprocess.STDOUT)
        out = subprocess.run([*prefect, "deployment", "run", "umo-pipeline/on-demand", "--watch",
                              "--watch-timeout", "300"], cwd=tmp_path, env=cli_env, capture_output=True, text=True)
        runs = api(server, "/flow_runs/filter", {"deployments": {"id": {"any_": [deployments["on-demand"]["id"]]}}})
        assert len(runs) == 1 and runs[0]["state_type"] == "COMPLETED", (
            out.stdout[-2000:] + (tmp_path / "worker.log").read_text()[-4000:])
        tasks = api(server, "/task_runs/filter", {"flow_runs": {"id": {"any_": [runs[0]["id"]]}}})
        assert [(t["name"], t["state_name"]) for t in tasks if t["name"] == "ok"] == [("ok", "Completed")]
        assert (project / "ok.out").read_text() == "done" and attempts(project, "ok") == 1  # in the project
    finally:
        if worker is not None:  # Ctrl-C, then SIGTERM if it lingers (then SIGKILL), its flow-run children too
            children = psutil.Process(worker.pid).children(recursive=True)
            stop(worker, timeout=20, signals=(signal.SIGINT, signal.SIGTERM))
            for child in children:
                if child.is_running():
                    child.kill()
        server.stop()
    assert not [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
