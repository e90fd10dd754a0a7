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
import time
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


def test_stages_run_then_skip_by_dvc_hashes(project, prefect_here):
    assert umo_pipeline(stages=["ok"], project_dir=str(project)) == {"ok": "ran"}
    assert (project / "ok.out").read_text() == "done"
    assert umo_pipeline(stages=["ok"], project_dir=str(project)) == {"ok": "skipped"}
    assert attempts(project, "ok") == 1
    (project / "ok.out").write_text("tampered")  # an output that no longer hashes as dvc.lock says: run again
    assert umo_pipeline(stages=["ok"], project_dir=str(project)) == {"ok": "ran"}
    assert attempts(project, "ok") == 2


def test_a_recorded_connection_failure_is_retried(project, prefect_here):
    result = umo_pipeline(stages=["flaky", "ok"], project_dir=str(project), retry_delay_seconds=0)
    assert result == {"ok": "ran", "flaky": "ran"}  # in dvc.yaml's order
    assert attempts(project, "flaky") == 2


def test_a_value_error_fails_at_once_whatever_the_log_says(project, prefect_here):
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


def test_a_stage_past_its_timeout_is_stopped_with_its_children_and_not_retried(project, prefect_here):
    with pytest.raises(StageTimedOut, match="ran past its timeout of 3 s"):
        umo_pipeline(stages=["slow"], project_dir=str(project), retry_delay_seconds=0, timeouts={"slow": 0.05})
    assert attempts(project, "slow") == 1
    child = int((project / "slow.pid").read_text())  # the stage's own child: its process group was stopped too
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


def test_progress_bars_become_a_progress_artifact_and_few_log_lines(project, prefect_here):
    from prefect.artifacts import Artifact

    from flows.umo_pipeline import _lines

    umo_pipeline(stages=["bar"], project_dir=str(project))
    artifact = Artifact.get("umo-progress-bar")
    assert artifact is not None and float(artifact.data) == 100.0
    # a redrawn line arrives once, as its last state; lines are split on \n only
    chunks = io.BytesIO(b"a\rb\rc\nplain\n\rx 1\rx 2\nend")
    assert list(_lines(chunks)) == [("c", True), ("plain", False), ("x 2", True), ("end", False)]


def test_unknown_stage_and_bad_override_fail_before_anything_runs(project, prefect_here):
    with pytest.raises(ValueError, match=r"no stage 'trian'"):
        umo_pipeline(stages=["trian"], project_dir=str(project))
    before = (project / "params.yaml").read_text()
    with pytest.raises(ConfigError, match=r"train\.learning_rat"):
        umo_pipeline(stages=["ok"], overrides={"train.learning_rat": 1e-4}, project_dir=str(project))
    assert (project / "params.yaml").read_text() == before and attempts(project, "ok") == 0


def test_overrides_run_as_a_dvc_experiment_and_leave_params_yaml_alone(project, prefect_here):
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
        text = r.read()
        return json.loads(text) if text else None


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` for this module's tests (deployments, a worker, an automation, a pause)."""
    from servers import PrefectServer

    server = PrefectServer(tmp_path_factory.mktemp("prefect")).start()
    yield server
    server.stop()


@pytest.fixture
def prefect_here(prefect_server):
    """This process's flows on the module's real server (instead of the test harness's own: one server start)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

    from prefect.logging.handlers import APILogHandler

    with temporary_settings({PREFECT_API_URL: f"{prefect_server.uri}/api", PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        yield
        APILogHandler().flush()  # this test's logs reach the server while it runs


def cli_env(server, **extra: str) -> dict[str, str]:
    return server.env(**extra) | {"PATH": f"{Path(PY).parent}{os.pathsep}{os.environ['PATH']}"}


def git_commit(root: Path, message: str) -> str:
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.name=umo-test", "-c", "user.email=test@umo.invalid", "commit", "-qm", message],
                   cwd=root, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()


def test_prefect_server_worker_deploy_and_run_pinned(initialized, prefect_server, tmp_path):
    """`prefect deploy --all` of prefect.yaml and of infra/prefect-pinned.yaml against a real server; a process
    worker runs the pinned on-demand deployment: a clone of the repository at the deployed commit (here the tiny
    project, with its `ok` stage), even after the repository moved on. The worker is stopped by its PID, with its
    flow-run children."""
    from servers import stop

    server = prefect_server
    project = shutil.copytree(initialized, tmp_path / "project", symlinks=True)
    dvc_yaml = yaml.safe_load((project / "dvc.yaml").read_text())
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"ok": dvc_yaml["stages"]["ok"]}}, width=10_000))
    shutil.copy(ROOT / "prefect.yaml", project / "prefect.yaml")  # its entrypoints: flows/umo_pipeline.py
    shutil.copytree(ROOT / "flows", project / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    (project / "infra").mkdir()
    for name in ("prefect-pinned.yaml", "worker_checkout.sh"):
        shutil.copy(ROOT / "infra" / name, project / "infra" / name)
    pinned = git_commit(project, "deployable")
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    worker, children = None, []
    try:
        env = cli_env(server)
        prefect = [PY, "-m", "prefect", "--no-prompt"]
        # the pool through the API (a CLI start costs seconds), the deployments through `prefect deploy`, as a team does
        if not any(p["name"] == "umo-process" for p in api(server, "/work_pools/filter")):
            from prefect.workers.process import ProcessWorker  # what `work-pool create --type process` sends

            api(server, "/work_pools/", {"name": "umo-process", "type": "process",
                                         "base_job_template": ProcessWorker.get_default_base_job_template()})
        for cmd in (["deploy", "--all"], ["deploy", "--all", "--prefect-file", "infra/prefect-pinned.yaml"]):
            done = subprocess.run([*prefect, *cmd], cwd=project, env=env, capture_output=True, text=True)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        deployments = {d["name"]: d for d in api(server, "/deployments/filter")}
        assert set(deployments) == {"nightly-retrain", "weekly-champion-reevaluation", "on-demand",
                                    "nightly-retrain-pinned", "on-demand-pinned"}
        crons = {name: [s["schedule"]["cron"] for s in d["schedules"]] for name, d in deployments.items()}
        assert crons["nightly-retrain"] == crons["nightly-retrain-pinned"] == ["0 2 * * *"]
        assert crons["weekly-champion-reevaluation"] == ["0 4 * * 0"] and crons["on-demand"] == []
        for d in deployments.values():  # one run at a time per deployment; a second one waits
            assert d["work_pool_name"] == "umo-process" and d["global_concurrency_limit"]["limit"] == 1, d["name"]
            assert d["concurrency_options"]["collision_strategy"] == "ENQUEUE", d["name"]
        # the plain deployments: the worker host's checkout, resolved when the run starts there
        assert deployments["on-demand"]["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $UMO_PROJECT_DIR }}"}}]
        # the pinned ones: the commit, resolved at deploy time
        (clone,) = [step["prefect.deployments.steps.git_clone"] for step in deployments["on-demand-pinned"]["pull_steps"]
                    if "prefect.deployments.steps.git_clone" in step]
        assert clone["commit_sha"] == pinned and clone["repository"] == "{{ $UMO_GIT_URL }}"

        (project / "ok.py").write_text("raise SystemExit('the repository moved on: not the deployed commit')\n")
        git_commit(project, "a later commit, never deployed")
        log = open(tmp_path / "worker.log", "wb")
        worker = subprocess.Popen([*prefect, "worker", "start", "--pool", "umo-process", "--limit", "1"],
                                  cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                  env=env | {"UMO_GIT_URL": str(project), "UMO_RUNS_DIR": str(runs_dir),
                                             "PREFECT_WORKER_QUERY_SECONDS": "1"})  # (default 10 s)
        out = subprocess.run([*prefect, "deployment", "run", "umo-pipeline/on-demand-pinned", "--watch",
                              "--watch-interval", "1", "--watch-timeout", "300"], cwd=tmp_path, env=env, capture_output=True, text=True)
        runs = api(server, "/flow_runs/filter",
                   {"deployments": {"id": {"any_": [deployments["on-demand-pinned"]["id"]]}}})
        assert len(runs) == 1 and runs[0]["state_type"] == "COMPLETED", (
            out.stdout[-2000:] + (tmp_path / "worker.log").read_text()[-4000:])
        tasks = api(server, "/task_runs/filter", {"flow_runs": {"id": {"any_": [runs[0]["id"]]}}})
        assert [(t["name"], t["state_name"]) for t in tasks if t["name"] == "ok"] == [("ok", "Completed")]
        checkout = runs_dir / f"umo-{pinned}"  # the clone at the deployed commit ran the stage
        assert (checkout / "ok.out").read_text() == "done" and attempts(checkout, "ok") == 1
        assert not (project / "ok.out").exists()
    finally:
        if worker is not None:  # Ctrl-C, then SIGTERM if it lingers (then SIGKILL), its flow-run children too
            children = psutil.Process(worker.pid).children(recursive=True)
            stop(worker, timeout=20, signals=(signal.SIGINT, signal.SIGTERM))
            for child in children:
                if child.is_running():
                    child.kill()
    assert not [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def run_flow_process(server, project: Path, log: Path, **kwargs) -> subprocess.Popen:
    """umo_pipeline(project_dir=project, **kwargs) in its own process, against the real server."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from flows.umo_pipeline import umo_pipeline; "
            f"umo_pipeline(project_dir={str(project)!r}, **{kwargs!r})")
    return subprocess.Popen([PY, "-c", code], cwd=project, env=cli_env(server), stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT)


def test_a_failed_flow_run_calls_the_alert_webhook(project, prefect_server, tmp_path):
    """flows/alerts.py's automation on the real server: a failed umo-pipeline run POSTs to the webhook."""
    from servers import WebhookSink

    sink = WebhookSink()
    try:
        out = subprocess.run([PY, str(ROOT / "flows/alerts.py"), "--webhook-url", sink.url, "--allow-private-urls"],
                             env=cli_env(prefect_server), capture_output=True, text=True)
        assert out.returncode == 0 and "automation umo-flow-run-failed" in out.stdout, out.stderr[-3000:]
        flow_run = run_flow_process(prefect_server, project, tmp_path / "flow.log", stages=["broken"])
        assert flow_run.wait(timeout=300) != 0
        (alert,) = sink.wait(timeout=90)
    finally:
        sink.stop()
    assert alert["flow"] == "umo-pipeline" and alert["state"] == "Failed", alert
    assert "stage 'broken' failed" in alert["message"] and alert["flow_run_id"]
    assert alert["url"].startswith("http") and alert["flow_run_id"] in alert["url"]


def wait_paused(server, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-4000:]
        paused = api(server, "/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}})
        if paused:
            return paused[0]
        time.sleep(0.5)
    raise TimeoutError(log.read_text()[-4000:])


def test_human_approval_pauses_the_flow_then_deploys_or_stops(initialized, prefect_server, tmp_path):
    """registry.approval human: the gate passed a version; the flow pauses with the approval form, the answer
    comes through the server's API, and the run goes on to deploy (approve) or stops before it (reject). The
    answer, its reason and the approver are tags of the MLflow model version."""
    from mlflow import MlflowClient

    from flows.umo_pipeline import GATE_RECORD as GATE

    project = shutil.copytree(initialized, tmp_path / "project", symlinks=True)
    store = f"sqlite:///{project / 'mlflow.db'}"
    # gate: records a passed decision on the version in version.txt (as `umo gate` does when a person must answer);
    # deploy: records what holds `champion` (as `umo deploy` deploys the champion)
    (project / "gate.py").write_text(
        "import json, os; v = open('version.txt').read().strip(); os.makedirs('artifacts/registry', exist_ok=True)\n"
        "json.dump({'model': 'umo-flux2-klein-lora', 'version': v, 'passed': True, 'approval': 'pending', "
        "'champion_before': None, 'rules': {'id_sim': 'pass: +2.1 [+0.4, +3.9]'}}, "
        "open('artifacts/registry/gate.json', 'w'))\n")
    (project / "deploy.py").write_text(
        "import json, sys; from mlflow import MlflowClient\n"
        f"v = MlflowClient({store!r}, {store!r}).get_model_version_by_alias('umo-flux2-klein-lora', 'champion')\n"
        "json.dump({'version': str(v.version)}, open('deployed.json', 'w'))\n")
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "gate": {"cmd": f"{PY} gate.py", "deps": ["version.txt"], "outs": [{GATE: {"cache": False}}]},
        "deploy": {"cmd": f"{PY} deploy.py", "deps": [GATE], "outs": [{"deployed.json": {"cache": False}}]},
    }}, width=10_000, sort_keys=False))
    write_overrides(project / "params.yaml", ["registry.approval=human", f"tracking.tracking_uri={store}"])
    client = MlflowClient(store, store)
    client.create_registered_model("umo-flux2-klein-lora")
    for v in ("1", "2"):
        client.create_model_version("umo-flux2-klein-lora", source=str(project), tags={"gate.decision": "passed"})

    # one process runs both flows (version 1, then version 2), each pausing for its answer
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from flows.umo_pipeline import umo_pipeline\n"
            f"for v in ('1', '2'):\n    open('version.txt', 'w').write(v); umo_pipeline(project_dir={str(project)!r})\n")
    log = tmp_path / "flows.log"
    proc = subprocess.Popen([PY, "-c", code], cwd=project, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            env=cli_env(prefect_server, UMO_APPROVAL_POLL_SECONDS="1"))

    def answer(run_input: dict) -> None:
        paused = wait_paused(prefect_server, proc, log)
        bad = urllib.request.Request(f"{prefect_server.uri}/api/flow_runs/{paused['id']}/resume", method="POST",
                                     data=json.dumps({"run_input": {"decision": "maybe", "reason": "x"}}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(bad, timeout=30) as r:  # the form's types are checked: refused, still paused
            assert json.loads(r.read())["status"] == "REJECT"
        assert api(prefect_server, f"/flow_runs/{paused['id']}/resume", {"run_input": run_input})["status"] == "ACCEPT"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and api(prefect_server, "/flow_runs/filter", {"flow_runs": {
                "id": {"any_": [paused["id"]]}}})[0]["state_type"] not in ("COMPLETED", "FAILED", "CRASHED"):
            time.sleep(0.5)

    answer({"decision": "approve", "reason": "faces hold on the held-out set", "approver": "alice"})
    tags = client.get_model_version("umo-flux2-klein-lora", "1").tags
    assert (tags["approval.status"], tags["approval.reason"], tags["approval.approver"]) == (
        "approved", "faces hold on the held-out set", "alice")
    assert str(client.get_model_version_by_alias("umo-flux2-klein-lora", "champion").version) == "1"
    assert json.loads((project / "deployed.json").read_text()) == {"version": "1"}  # deployed after the answer

    answer({"decision": "reject", "reason": "a regression on crowded scenes", "approver": "bob"})
    assert proc.wait(timeout=120) == 0, log.read_text()[-4000:]
    tags = client.get_model_version("umo-flux2-klein-lora", "2").tags
    assert (tags["approval.status"], tags["approval.reason"]) == ("rejected", "a regression on crowded scenes")
    assert str(client.get_model_version_by_alias("umo-flux2-klein-lora", "champion").version) == "1"
    assert json.loads((project / "deployed.json").read_text()) == {"version": "1"}  # no deployment of version 2

    from umo.registry import RegistryError, approve

    client.create_model_version("umo-flux2-klein-lora", source=str(project), tags={"gate.decision": "failed"})
    config = load_config(project / "params.yaml")
    with pytest.raises(RegistryError, match="the gate did not pass it"):
        approve(config.registry, config.tracking, version="3", approved=True, reason="looks fine", approver="eve")
    assert str(client.get_model_version_by_alias("umo-flux2-klein-lora", "champion").version) == "1"


def test_links_and_the_matching_image_point_at_the_mlflow_server_and_the_deployment(tmp_path, prefect_here):
    """With tracking on an MLflow server, the flow links the model version's page and shows the evaluation's
    matching picture as an image artifact served by that server; the deployment's link is its location."""
    from prefect import flow
    from prefect.artifacts import Artifact

    from flows.umo_pipeline import DEPLOYED_RECORD, REGISTERED_RECORD, _publish_registry

    (tmp_path / REGISTERED_RECORD).parent.mkdir(parents=True)
    (tmp_path / REGISTERED_RECORD).write_text(json.dumps({"model": "umo-x", "version": "7", "run_id": "abc123"}))
    (tmp_path / DEPLOYED_RECORD).write_text(json.dumps({"model": "umo-x", "version": "7",
                                                         "location": "s3://models/umo", "changed": True}))
    (tmp_path / "report/grids").mkdir(parents=True)
    (tmp_path / "report/grids/improved-0-item-3.png").write_bytes(b"png")
    config = load_config(None, ["tracking.tracking_uri=http://127.0.0.1:5999"])

    @flow
    def publish():
        _publish_registry(tmp_path, Path("report"), config)

    publish()
    assert Artifact.get("umo-model-version").data == "[umo-x version 7 (MLflow)](http://127.0.0.1:5999/#/models/umo-x/versions/7)"
    assert Artifact.get("umo-deployment").data == "[umo-x version 7: s3://models/umo](s3://models/umo)"
    assert Artifact.get("umo-matching-image").data == (
        "http://127.0.0.1:5999/get-artifact?path=evaluation/grids/improved-0-item-3.png&run_uuid=abc123")
