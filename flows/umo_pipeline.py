"""The production driver: dvc.yaml's stages as Prefect tasks (thin; the work is in `umo`, the chain in dvc.yaml).

Each task runs `dvc repro --single-item <stage>`, one way for every stage, so DVC's hashes decide what is skipped
(one `dvc status` of all stages first, and of each stage after one ran: an up-to-date stage completes as
`Skipped` without starting) and dvc.lock stays the lineage record whichever driver ran. A stage's output is
streamed into the flow's logs line by line (a progress bar's redraws become one line every 30 s), and its progress
file becomes the `umo-progress` artifact.

- **Overrides are experiments.** `umo_pipeline(overrides={...})` never writes the checkout's params.yaml: the
  stages run in a DVC experiment's own workspace (`umo.experiments`), saved as a DVC experiment of HEAD (`dvc exp
  show`), registered into the same registry.
- **Timeouts**: `orchestration.timeout_minutes` / `orchestration.timeouts` in params.yaml (or the flow's
  `timeouts` parameter, per deployment); a stage past its time is stopped, process group and all, and fails.
- **Retries only for transient failures**, decided from the exception inside the stage (`umo.failures`): each
  stage process writes a failure record; connection errors, timeouts, HTTP 5xx of MLflow or S3 and SIGTERM are
  retried, anything else fails at once. Training resumes from its checkpoints on a retry (`--resume auto`).
- **One registry writer at a time**: register, gate, an approval and deploy each hold the global concurrency
  limit `umo-registry` (made with one slot when missing), so two runs on two hosts never race on `champion`;
  the deployments themselves run one at a time (prefect.yaml's `concurrency_limit`).
- **Human approval** (`registry.approval: human`): after the gate passes a version, the flow pauses with a typed
  form (approve or reject, a reason); the answer becomes tags on the model version, and only an approved version
  is deployed.
- **Artifacts**: the evaluation report, the judge's matching (pictures), the gate's rules and numbers (a table),
  links to the MLflow model version and the deployed location, training progress.

    umo_pipeline(overrides={"train.learning_rate": 2e-4})   # a DVC experiment; params.yaml is untouched
    reevaluate_champion(benchmark="xverse", path="benchmarks/xverse.json")
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

import yaml
from PIL import Image
from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_image_artifact, create_link_artifact, create_markdown_artifact,
                               create_progress_artifact, create_table_artifact, update_progress_artifact)
from prefect.concurrency.sync import concurrency
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.states import Completed
from pydantic import Field

# The umo of this checkout, whatever else the interpreter has installed: a worker that runs a pinned clone
# (infra/prefect-pinned.yaml) must import the clone's code, not the image's.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from umo.config import Config, load_config  # noqa: E402
from umo.experiments import Experiment  # noqa: E402
from umo.failures import FAILURE_DIR_ENV, read_records  # noqa: E402
from umo.progress import PROGRESS_EVERY_ENV, PROGRESS_FILE_ENV  # noqa: E402

# The gate stage's record in dvc.yaml, turned into the `umo-gate` artifact; register's and deploy's, for links.
GATE_RECORD = "artifacts/registry/gate.json"
REGISTERED_RECORD = "artifacts/registry/registered.json"
DEPLOYED_RECORD = "artifacts/registry/deployed.json"
REGISTRY_STAGES = ("register", "gate", "deploy", "approve")  # they write the registry: one flow at a time holds them
REGISTRY_LIMIT = "umo-registry"
TAIL_LINES = 40
PROGRESS_LINE_EVERY = 30.0  # seconds between two log lines of a redrawn progress bar
TERMINATE_GRACE = 30.0
# How often a paused flow looks for the person's answer (Prefect's default: 10 s).
APPROVAL_POLL_SECONDS = int(os.environ.get("UMO_APPROVAL_POLL_SECONDS", "10"))  # seconds between SIGTERM and SIGKILL of a stage past its timeout


class StageFailed(RuntimeError):
    """A stage's command exited non-zero. `transient`: every failure record its processes wrote says so
    (umo.failures); a stage that wrote none (killed, or not a umo command) is not retried."""

    def __init__(self, stage: str, returncode: int, tail: list[str], records: list[dict] | None = None):
        self.stage, self.returncode, self.tail, self.records = stage, returncode, tail, records or []
        self.transient = bool(self.records) and all(r["transient"] for r in self.records)
        causes = "; ".join(f"{r['type']}: {r['message'][:200]}" for r in self.records) or "no failure record"
        kind = "transient, will be retried" if self.transient else "not retried"
        super().__init__(f"stage {stage!r} failed with exit code {returncode} ({kind}: {causes}); last lines:\n"
                         + "\n".join(tail[-15:]))


class StageTimedOut(StageFailed):
    """A stage ran past its timeout and was stopped: not retried (it would most likely time out again)."""

    def __init__(self, stage: str, seconds: float, tail: list[str]):
        RuntimeError.__init__(self, f"stage {stage!r} ran past its timeout of {seconds:.0f} s and was stopped "
                                    "(orchestration.timeouts); last lines:\n" + "\n".join(tail[-15:]))
        self.stage, self.returncode, self.tail, self.records, self.transient = stage, -1, tail, [], False


class Approval(RunInput):
    """The form a person fills in when registry.approval is human."""

    decision: Literal["approve", "reject"] = Field(description="approve: the version becomes champion and is "
                                                               "deployed; reject: nothing changes")
    reason: str = Field(min_length=3, description="why (kept as the model version's tag approval.reason)")
    approver: str = Field(default="", description="who answers (default: the Prefect user, or 'unknown')")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The stages' environment: this interpreter's scripts first (umo, dvc, accelerate) and unbuffered output,
    so a worker started without the virtualenv activated runs the same tools and its logs arrive as written."""
    bin_dir = str(Path(sys.executable).parent)
    return os.environ | {"PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1"} | (
        extra or {})


def _lines(stream):
    """A process's output as lines split on '\\n' only; a line redrawn with '\\r' (a progress bar) comes as
    (its last state, True)."""
    buf = b""
    while chunk := stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536):
        buf += chunk
        *done, buf = buf.split(b"\n")
        for raw in done:
            redrawn = b"\r" in raw.rstrip(b"\r")
            yield raw.rstrip(b"\r").rsplit(b"\r", 1)[-1].decode(errors="replace"), redrawn
    if buf:
        yield buf.rsplit(b"\r", 1)[-1].decode(errors="replace"), False


class _Progress:
    """The `umo-progress` artifact of a stage, fed by its progress file (umo.progress)."""

    def __init__(self, file: Path, stage: str) -> None:
        self.file, self.stage, self.id, self.seen = file, stage, None, None

    def poll(self) -> None:
        try:
            state = json.loads(self.file.read_text())
        except (OSError, ValueError):
            return
        if state.get("fraction") is None or state == self.seen:
            return
        self.seen = state
        pct = 100.0 * float(state["fraction"])
        text = f"{self.stage}: {state['desc']} {state['n']}/{state['total']} {state['unit']}"
        if self.id is None:
            self.id = create_progress_artifact(pct, key=f"umo-progress-{self.stage}", description=text)
        else:
            update_progress_artifact(UUID(str(self.id)), pct, description=text)


def _stream(cmd: list[str], cwd: Path, stage: str, *, timeout: float | None = None,
            env: dict[str, str] | None = None) -> None:
    """Run `cmd` in its own process group, every output line into the run's logger; StageFailed on a non-zero
    exit (with the failure records its processes wrote), StageTimedOut past `timeout` seconds."""
    logger = get_run_logger()
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    scratch = Path(tempfile.mkdtemp(prefix=f"umo-{stage}-"))
    progress = _Progress(scratch / "progress.json", stage)
    extra = (env or {}) | {FAILURE_DIR_ENV: str(scratch / "failures"), PROGRESS_FILE_ENV: str(progress.file),
                           PROGRESS_EVERY_ENV: str(PROGRESS_LINE_EVERY)}
    logger.info("$ %s", " ".join(cmd))
    timed_out = threading.Event()
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)

    def stop() -> None:  # the whole group: accelerate's workers, dvc's shell and the stage under it
        timed_out.set()
        for sig, wait in ((signal.SIGTERM, TERMINATE_GRACE), (signal.SIGKILL, 0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)

    watchdog = threading.Timer(timeout, stop) if timeout else None
    if watchdog:
        watchdog.daemon = True
        watchdog.start()
    last_redrawn = 0.0
    try:
        for line, redrawn in _lines(proc.stdout):
            tail.append(line)
            now = time.monotonic()
            if redrawn and now - last_redrawn < PROGRESS_LINE_EVERY:
                continue  # a bar's redraw: one line every PROGRESS_LINE_EVERY seconds
            last_redrawn = now if redrawn else last_redrawn
            logger.info("[%s] %s", stage, line)
            progress.poll()
        proc.wait()
    finally:
        if watchdog:
            watchdog.cancel()
        if proc.poll() is None:
            stop()
    progress.poll()
    if timed_out.is_set():
        raise StageTimedOut(stage, timeout, list(tail))
    if proc.returncode != 0:
        records = read_records(scratch / "failures") if (scratch / "failures").is_dir() else []
        raise StageFailed(stage, proc.returncode, list(tail), records)


def _changed(target: str, cwd: Path, env: dict[str, str] | None = None) -> set[str]:
    """DVC's own verdict on `target` (a stage, or dvc.yaml for all of its stages): the stages whose deps, params
    or outs no longer hash as dvc.lock recorded them."""
    out = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", target], cwd=cwd, env=_env(env),
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise StageFailed(target, out.returncode, (out.stdout + out.stderr).splitlines()[-TAIL_LINES:])
    return set(json.loads(out.stdout or "{}"))


def _retry_transient(task, task_run, state) -> bool:
    """retry_condition_fn: retry a StageFailed only when its processes recorded a transient failure."""
    try:
        state.result()
    except StageFailed as err:
        return err.transient
    except Exception:  # noqa: BLE001 - anything else is a bug or bad input: not retried
        return False
    return False


@task(task_run_name="{stage}", retries=2, retry_delay_seconds=60, retry_condition_fn=_retry_transient)
def run_stage(stage: str, project_dir: str, unchanged: bool = False, timeout: float | None = None,
              force: bool = False, env: dict[str, str] | None = None) -> str:
    """`dvc repro --single-item <stage>`, unless DVC says the stage is up to date (then Skipped). unchanged: the
    flow's status of every stage, taken before any of them ran, already said so (no second `dvc status`)."""
    cwd = Path(project_dir)
    if not force and (unchanged or stage not in _changed(stage, cwd, env)):
        get_run_logger().info("stage %s: inputs unchanged (dvc status), skipped", stage)
        return Completed(name="Skipped", message="inputs unchanged (dvc status)")
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", *(["--force"] if force else []), stage]
    _stream(cmd, cwd, stage, timeout=timeout, env=env)
    return "ran"


@task(task_run_name="{name}", retries=2, retry_delay_seconds=60, retry_condition_fn=_retry_transient)
def run_command(name: str, cmd: list[str], project_dir: str, timeout: float | None = None,
                env: dict[str, str] | None = None) -> None:
    """A umo command outside dvc.yaml (the champion's re-evaluation, an approval), streamed and retried like a
    stage."""
    _stream(cmd, Path(project_dir), name, timeout=timeout, env=env)


# ------------------------------------------------------------------------------------------------ artifacts


def _publish_evaluation(cwd: Path, report: Path, key: str) -> None:
    report_md = cwd / report / "report.md"
    if report_md.is_file():
        create_markdown_artifact(key=key, markdown=report_md.read_text(),
                                 description=f"{report}: base vs candidate (vs champion), judge-scored")


def _publish_matching(cwd: Path, report: Path, key: str, height: int = 160) -> None:
    """The pictures of the judge's matching for the items the report draws in grids/ (most improved, most
    regressed; else its first two items), base and candidate, as one markdown artifact with the pictures inline
    (JPEG data URIs, so the flow run shows them whatever the report folder's host)."""
    folder = cwd / report
    picks = [g.name.split("-", 2) for g in sorted((folder / "grids").glob("*.png"))]  # <label>-<k>-<item>.png
    if not picks:  # nothing improved or regressed: the first items instead
        picks = [("item", "", p.name) for p in sorted((folder / "matching" / "candidate").glob("*.png"))[:2]]
    lines = [f"## Pictures of the matching: {report}", "",
             "Each generated image with the judge's faces boxed, and the Hungarian pairs to the reference "
             "thumbnails with their similarities; unmatched faces dashed, references without a face crossed.", ""]
    shown = 0
    for label, _, stem in picks:
        for model in ("base", "candidate"):
            picture = folder / "matching" / model / stem
            if picture.is_file():
                with Image.open(picture) as im:
                    im = im.convert("RGB")
                    im.thumbnail((10_000, height * 2))
                    buf = io.BytesIO()
                    im.save(buf, format="JPEG", quality=80)
                data = base64.b64encode(buf.getvalue()).decode()
                lines += [f"**{label}**, item `{stem[:-4]}`, {model}:", "", f"![{model} {stem}](data:image/jpeg;base64,"
                          f"{data})", ""]
                shown += 1
    if shown:
        create_markdown_artifact(key=key, markdown="\n".join(lines),
                                 description=f"{report}/matching: what the judge matched ({shown} pictures)")


def _read(cwd: Path, record: str) -> dict | None:
    path = cwd / record
    return json.loads(path.read_text()) if path.is_file() else None


def _publish_gate(cwd: Path) -> None:
    d = _read(cwd, GATE_RECORD)
    if d is None:
        return
    rows = [{"rule": name, "result": detail.split(":", 1)[0].upper(), "numbers": detail.split(":", 1)[-1].strip()}
            for name, detail in d["rules"].items()]
    verdict = "PASSED" if d["passed"] else "FAILED"
    if d["passed"] and d.get("approval") == "pending":
        verdict += ", waiting for a person's approval"
    elif d["passed"]:
        verdict += ": champion"
    create_table_artifact(rows, key="umo-gate",
                          description=f"Gate: {d['model']} version {d['version']}: {verdict} (champion before: "
                                      f"{d['champion_before'] or 'none'}; registry.gate policy)")


def _ui_base(config: Config) -> str | None:
    """The MLflow UI's address when tracking is an HTTP server: the configured URI, else $MLFLOW_TRACKING_URI (the
    embedded default, a local SQLite store, has no UI to link)."""
    from umo.tracking import redact_uri  # lazy: mlflow, only where a run registered something

    uri = redact_uri(config.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", ""))
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None


def _publish_registry(cwd: Path, report: Path, config: Config) -> None:
    """Links to the registered model version (MLflow's UI) and to the deployed location; the evaluation's first
    comparison grid (references | base | candidate, with the judge's matching) as an image artifact, when an
    MLflow server serves it (the registered run's evaluation/grids, by URL; with a local store the
    `umo-matching` markdown artifact holds the pictures inline)."""
    registered, deployed, ui = _read(cwd, REGISTERED_RECORD), _read(cwd, DEPLOYED_RECORD), _ui_base(config)
    if registered and ui:
        create_link_artifact(f"{ui}/#/models/{registered['model']}/versions/{registered['version']}",
                             link_text=f"{registered['model']} version {registered['version']} (MLflow)",
                             key="umo-model-version", description="the model version this run registered")
        grids = sorted((cwd / report / "grids").glob("*.png"))
        if grids:
            create_image_artifact(f"{ui}/get-artifact?path=evaluation/grids/{grids[0].name}"
                                  f"&run_uuid={registered['run_id']}",
                                  key="umo-matching-image", description=f"the evaluation's grid {grids[0].stem}")
    if deployed and deployed.get("location"):
        location = deployed["location"]
        link = location if "://" in location else (cwd / location).resolve().as_uri()
        create_link_artifact(link, link_text=f"{deployed['model']} version {deployed['version']}: {location}",
                             key="umo-deployment", description="what current.json points at after this run")


# ------------------------------------------------------------------------------------------------ the flows


def _stage_names(cwd: Path) -> list[str]:
    dvc_yaml = cwd / "dvc.yaml"
    if not dvc_yaml.is_file():
        raise FileNotFoundError(f"{dvc_yaml}: not a umo checkout (project_dir must hold dvc.yaml)")
    return list((yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}))


def _ensure_registry_limit() -> None:
    """The global concurrency limit `umo-registry` with one slot (made once; a limit someone set is kept)."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(REGISTRY_LIMIT)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=REGISTRY_LIMIT, limit=1))
            except ObjectAlreadyExists:
                pass


@contextmanager
def _registry_slot(stage: str):
    """The `umo-registry` slot around a stage that writes the registry (register, gate, deploy, approve)."""
    if stage not in REGISTRY_STAGES:
        yield
        return
    _ensure_registry_limit()
    with concurrency(REGISTRY_LIMIT, occupy=1, strict=True):
        yield


def _ask_approval(cwd: Path, config: Config, timeout_s: float, env: dict[str, str]) -> bool:
    """Pause for a person's answer on the version the gate passed; record it (`umo approve`). True: approved."""
    gate = _read(cwd, GATE_RECORD)
    logger = get_run_logger()
    logger.info("%s version %s passed the gate: waiting for a person's approval (Resume in the Prefect UI)",
                gate["model"], gate["version"])
    answer = pause_flow_run(
        wait_for_input=Approval.with_initial_data(
            description=f"**{gate['model']} version {gate['version']}** passed the gate ("
                        + ", ".join(f"{k}: {v}" for k, v in gate["rules"].items())
                        + "). Approve it to make it champion and deploy it, or reject it.",
            decision="reject", reason=""),
        timeout=int(timeout_s), poll_interval=APPROVAL_POLL_SECONDS, key=f"approval-{gate['model']}-{gate['version']}")
    approver = answer.approver or os.environ.get("USER", "unknown")
    cmd = [sys.executable, "-m", "umo.cli", "approve", "--version", str(gate["version"]), "--decision",
           answer.decision, "--reason", answer.reason, "--approver", approver]
    with _registry_slot("approve"):
        run_command.with_options(retries=config.orchestration.retries)("approve", cmd, str(cwd), env=env)
    logger.info("%s version %s: %s by %s (%s)", gate["model"], gate["version"], answer.decision, approver,
                answer.reason)
    return answer.decision == "approve"


@flow(name="umo-pipeline")
def umo_pipeline(overrides: dict[str, Any] | None = None, stages: list[str] | None = None,
                 project_dir: str = ".", retry_delay_seconds: float | None = None,
                 timeouts: dict[str, float] | None = None) -> dict[str, str]:
    """The chain of dvc.yaml, stage by stage; returns {stage: "ran" | "skipped"}.

    overrides: dotted params.yaml keys, e.g. {"train.learning_rate": 2e-4} (validated before anything runs): the
      run is a DVC experiment in its own workspace; the checkout's params.yaml is never written.
    stages: a subset, in dvc.yaml's order (default: all of them); upstream stages are not run for you.
    retry_delay_seconds, timeouts ({stage: minutes}): replace params.yaml's `orchestration` settings.
    """
    project = Path(project_dir).resolve()
    known = _stage_names(project)
    todo = list(stages or known)
    unknown = [s for s in todo if s not in known]
    if unknown:
        raise ValueError(f"{project / 'dvc.yaml'}: no stage {unknown[0]!r} (stages: {', '.join(known)})")
    todo.sort(key=known.index)
    items = [f"{key}={json.dumps(value)}" for key, value in sorted((overrides or {}).items())]
    config = load_config(project / "params.yaml", items)  # a bad override or params.yaml: refused here
    logger = get_run_logger()
    experiment, cwd, env = None, project, {}
    if items:
        experiment = Experiment.open(project, items)
        cwd, env = experiment.workspace, experiment.env()
        logger.info("overrides %s: DVC experiment %s in %s (params.yaml of %s untouched)", ", ".join(items),
                    experiment.name, cwd, project)
    orch = config.orchestration
    delay = orch.retry_delay_seconds if retry_delay_seconds is None else retry_delay_seconds
    stage_task = run_stage.with_options(retries=orch.retries, retry_delay_seconds=delay)
    # One `dvc status` of every stage first. Its verdict holds for a stage as long as nothing upstream has run in
    # this flow; after a stage ran, each later one asks DVC again (the run may have changed its inputs, or not).
    changed = _changed("dvc.yaml", cwd, env)
    done: dict[str, str] = {}
    for stage in todo:
        timeout = 60 * timeouts[stage] if timeouts and stage in timeouts else orch.timeout_for(stage)
        unchanged = stage not in changed and "ran" not in done.values()
        force = False
        if stage == "deploy" and done.get("gate") == "ran" and config.registry.approval == "human":
            record = _read(cwd, GATE_RECORD) or {}
            if record.get("passed") and record.get("approval") == "pending":
                if not _ask_approval(cwd, config, orch.approval_timeout_hours * 3600, env):
                    done["deploy"] = "rejected"
                    continue
                force = True  # the champion changed in the registry, which DVC does not see
        with _registry_slot(stage):
            state = stage_task(stage, str(cwd), unchanged, timeout, force, env, return_state=True)
        state.result()  # a failed stage raises its StageFailed here: the flow stops and fails with it
        done[stage] = "skipped" if state.name == "Skipped" else "ran"
        if stage == "evaluate":
            _publish_evaluation(cwd, Path(config.eval.out), "umo-evaluation")
            _publish_matching(cwd, Path(config.eval.out), "umo-matching")
        elif stage == "evaluate_scaling":
            _publish_evaluation(cwd, Path(config.eval.scaling.out), "umo-scaling")
        elif stage == "gate":
            _publish_gate(cwd)
    if {"register", "deploy"} & set(done):
        _publish_registry(cwd, Path(config.eval.out), config)
    if experiment is not None:
        ref = experiment.save(todo)
        logger.info("experiment %s saved as %s (dvc exp show)", experiment.name, ref)
    logger.info("stages: %s", ", ".join(f"{s} {r}" for s, r in done.items()))
    return done


@flow(name="umo-champion-reevaluation")
def reevaluate_champion(project_dir: str = ".", benchmark: str | None = None, path: str | None = None,
                        out: str | None = None, retry_delay_seconds: float | None = None) -> str:
    """The registry's champion against the base on a benchmark (default: params.yaml's eval section), with the
    same seeds and judge as the gate's evaluation; the report becomes the `umo-champion-evaluation` artifact.
    Not a DVC stage: the champion lives in the registry, not in the workspace."""
    cwd = Path(project_dir).resolve()
    sets = [f"eval.benchmark={benchmark}"] if benchmark else []
    sets += [f"eval.path={path}"] if path else []
    config = load_config(cwd / "params.yaml", sets)
    report = Path(out or f"artifacts/reports/champion-{config.eval.benchmark}")
    cmd = [sys.executable, "-m", "umo.cli", "evaluate", "--lora", "registry", "--out", str(report)]
    for item in sets:
        cmd += ["-S", item]
    orch = config.orchestration
    delay = orch.retry_delay_seconds if retry_delay_seconds is None else retry_delay_seconds
    run_command.with_options(retries=orch.retries, retry_delay_seconds=delay)(
        "evaluate-champion", cmd, str(cwd), orch.timeout_for("evaluate"))
    _publish_evaluation(cwd, report, "umo-champion-evaluation")
    return str(cwd / report)
