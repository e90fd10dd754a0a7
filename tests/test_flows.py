"""flows/umo_pipeline.py under Prefect's test harness, on a tiny DVC project whose stages are one-line scripts:
what is retried (a lost connection) and what is not (anything else), skipping by DVC's hashes, overrides; and
prefect.yaml's deployments on a real Prefect server, run by a real process worker."""

from __future__ import annotations

import io
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
from flows.umo_pipeline import StageFailed, StageTimedOut, umo_pipeline  # noqa: E402

PY = sys.executable
# Each stage counts its attempts in <stage>.n, so the tests see how often DVC ran it.
COUNT = "import os,sys; f='{s}.n'; n=int(open(f).read()) if os.path.exists(f) else 0; open(f,'w').write(str(n+1)); "
# A real connection failure (nothing listens on port 9 of 127.0.0.1), recorded as umo's commands record theirs.
REFUSED = ("import requests; from umo import failures\n"
           "try: requests.get('http://127.0.0.1:9/api/2.0/mlflow/runs/create', timeout=5)\n"
           "except Exception as e: failures.record(e); sys.exit(1)\n")
STAGES = {
    "ok": COUNT.format(s="ok") + "open('ok.out','w').write('done'); print('made ok.out')",
    "flaky": COUNT.format(s="flaky") + "\nif n == 0:\n    " + REFUSED.replace("\n", "\n    ").rstrip()
             + "\nopen('flaky.out','w').write('done')",
    "slow": COUNT.format(s="slow") + "import subprocess, time; p = subprocess.Popen(['sleep', '120']); "
                                     "open('slow.pid','w').write(str(p.pid)); print('working', flush=True); "
                                     "time.sleep(120)",
    "bar": "import sys, time; from umo.progress import progress\n"
           "bar = progress(total=40, desc='bar', unit='step')\n"
           "for i in range(40):\n    sys.stdout.write(f'\\rredrawn {i}'); sys.stdout.flush(); bar.update(1)\n"
           "bar.close(); print()",
    "show": "import yaml; lr = yaml.safe_load(open('params.yaml'))['train']['learning_rate']; "
            "open('lr.out','w').write(repr(lr))",
}


@pytest.fixture(scope="module")
def initialized(tmp_path_factory):
    """A git + DVC project with params.yaml (the real one) and the stages above, initialized and committed once
    (`dvc init` and `dvc config` are interpreter starts): each test gets a fresh copy of it."""
    root = tmp_path_factory.mktemp("flows") / "project"
    root.mkdir()
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    for name, code in STAGES.items():
        (root / f"{name}.py").write_text(code + "\n")
    stages = {name: {"cmd": f"{PY} {name}.py"} for name in STAGES}
    # A stage that exits on bad input through umo's own command (a ValueError: an approval without a reason),
    # after a line with connection words: the log's words decide nothing.
    stages["broken"] = {"cmd": f"{PY} -c \"{COUNT.format(s='broken')}print('requests.exceptions.ConnectionError: "
                               f"an old warning')\" && {PY} -m umo.cli approve --version 1 --decision approve "
                               f"--reason ' '"}
    for name in ("ok", "flaky", "show"):
        stages[name]["outs"] = [f"{name if name != 'show' else 'lr'}.out"]
    stages["show"]["params"] = ["train.learning_rate"]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, width=10_000))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([PY, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    subprocess.run([PY, "-m", "dvc", "config", "core.analytics", "false"], cwd=root, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.name=umo-test", "-c", "user.email=test@umo.invalid", "commit", "-qm",
                    "the tiny project"], cwd=root, check=True)
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


def test_a_recorded_connection_failure_is_retried(project, prefect_harness):
    result = umo_pipeline(stages=["flaky", "ok"], project_dir=str(project), retry_delay_seconds=0)
    assert result == {"ok": "ran", "flaky": "ran"}  # in dvc.yaml's order
    assert attempts(project, "flaky") == 2


def test_a_value_error_fails_at_once_whatever_the_log_says(project, prefect_harness):
    with pytest.raises(StageFailed) as err:
        umo_pipeline(stages=["broken"], project_dir=str(project), retry_delay_seconds=0)
    assert attempts(project, "broken") == 1  # not retried, though a line of its log names a ConnectionError
    assert not err.value.transient and err.value.returncode != 0
    assert [r["type"] for r in err.value.records] == ["umo.registry.RegistryError"]  # a ValueError
    assert "an approval needs a reason" in str(err.value)


def test_failure_records_classify_by_exception_type(tmp_path, monkeypatch):
    import botocore.exceptions
    import requests
    from mlflow.exceptions import MlflowException, RestException

    from umo import failures

    def raised(make):
        try:
            make()
        except BaseException as e:  # noqa: BLE001
            return e

    def wrapped():  # MLflow's way: its exception raised while handling requests' ConnectionError
        try:
            raise requests.exceptions.ConnectionError("Connection refused")
        except requests.exceptions.ConnectionError:
            raise MlflowException("API request to http://mlflow/api failed")  # noqa: B904

    def s3(status, code):
        return botocore.exceptions.ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                                               "PutObject")

    transient = [raised(wrapped), ConnectionRefusedError(), TimeoutError(), RestException({"error_code": "503"}),
                 RestException({"error_code": "INTERNAL_ERROR", "message": "db down"}), s3(503, "SlowDown"),
                 s3(500, "InternalError"), botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3"),
                 failures.Interrupted("SIGTERM")]
    deterministic = [ValueError("lora rank must be positive"), MlflowException("bad"), KeyError("x"),
                     RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "no"}), s3(403, "AccessDenied"),
                     s3(404, "NoSuchBucket"), RuntimeError("diverged")]
    assert [failures.is_transient(e) for e in transient] == [True] * len(transient)
    assert [failures.is_transient(e) for e in deterministic] == [False] * len(deterministic)
    monkeypatch.setenv(failures.FAILURE_DIR_ENV, str(tmp_path))
    failures.record(transient[0])
    (rec,) = failures.read_records(tmp_path)
    assert rec["transient"] and rec["type"] == "mlflow.exceptions.MlflowException"
    assert rec["chain"][1] == "requests.exceptions.ConnectionError"


def test_umo_records_a_real_mlflow_outage_as_transient(tmp_path):
    """`umo gate` against an MLflow address where nothing listens: its failure record says transient."""
    from servers import free_port

    from umo import failures

    env = os.environ | {failures.FAILURE_DIR_ENV: str(tmp_path), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    out = subprocess.run([PY, "-m", "umo.cli", "gate", "-S", f"tracking.tracking_uri=http://127.0.0.1:{free_port()}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    (rec,) = failures.read_records(tmp_path)
    assert rec["transient"], rec


def test_a_stage_past_its_timeout_is_stopped_with_its_children_and_not_retried(project, prefect_harness):
    with pytest.raises(StageTimedOut, match="ran past its timeout of 3 s"):
        umo_pipeline(stages=["slow"], project_dir=str(project), retry_delay_seconds=0, timeouts={"slow": 0.05})
    assert attempts(project, "slow") == 1
    child = int((project / "slow.pid").read_text())  # the stage's own child: its process group was stopped too
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


def test_progress_bars_become_a_progress_artifact_and_few_log_lines(project, prefect_harness):
    from prefect.artifacts import Artifact

    from flows.umo_pipeline import _lines

    umo_pipeline(stages=["bar"], project_dir=str(project))
    artifact = Artifact.get("umo-progress-bar")
    assert artifact is not None and float(artifact.data) == 100.0
    # a redrawn line arrives once, as its last state; lines are split on \n only
    chunks = io.BytesIO(b"a\rb\rc\nplain\n\rx 1\rx 2\nend")
    assert list(_lines(chunks)) == [("c", True), ("plain", False), ("x 2", True), ("end", False)]


def test_unknown_stage_and_bad_override_fail_before_anything_runs(project, prefect_harness):
    with pytest.raises(ValueError, match=r"no stage 'trian'"):
        umo_pipeline(stages=["trian"], project_dir=str(project))
    before = (project / "params.yaml").read_text()
    with pytest.raises(ConfigError, match=r"train\.learning_rat"):
        umo_pipeline(stages=["ok"], overrides={"train.learning_rat": 1e-4}, project_dir=str(project))
    assert (project / "params.yaml").read_text() == before and attempts(project, "ok") == 0


def test_overrides_run_as_a_dvc_experiment_and_leave_params_yaml_alone(project, prefect_harness):
    before = (project / "params.yaml").read_bytes()
    committed = load_config(project / "params.yaml").train.learning_rate
    done = umo_pipeline(stages=["show"], overrides={"train.learning_rate": 2e-4}, project_dir=str(project))
    assert done == {"show": "ran"}
    assert (project / "params.yaml").read_bytes() == before  # byte-identical
    assert not (project / "lr.out").exists()  # the experiment ran in its own workspace
    shown = subprocess.run([PY, "-m", "dvc", "exp", "show", "--json"], cwd=project, capture_output=True, text=True,
                           check=True).stdout
    (exp,) = [e for row in json.loads(shown) for e in (row.get("experiments") or [])]
    (rev,) = exp["revs"]
    assert rev["name"].startswith("umo-")
    assert rev["data"]["params"]["params.yaml"]["data"]["train"]["learning_rate"] == 2e-4
    assert not list((project / ".dvc/tmp/umo-exps").glob("*"))  # its worktree is gone
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=project, capture_output=True, text=True).stdout
    assert len(worktrees.splitlines()) == 1, worktrees
    # the next default run uses the committed settings
    assert umo_pipeline(stages=["show"], project_dir=str(project)) == {"show": "ran"}
    assert (project / "lr.out").read_text() == repr(committed)
    assert (project / "params.yaml").read_bytes() == before


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
