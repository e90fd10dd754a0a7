"""The production driver: dvc.yaml's stages as Prefect tasks (thin; the work is in `umo`, the chain in dvc.yaml).

Each task runs `dvc repro --single-item <stage>` in the project checkout, one way for every stage, so DVC's
hashes decide what is skipped (one `dvc status` of all stages first, and of each stage after one ran: an
up-to-date stage completes as `Skipped` without starting) and dvc.lock stays the lineage record whichever
driver ran. Training is dvc.yaml's
`accelerate launch --config_file ${train.accelerate_config} ...`, a subprocess whose output, like every
stage's, is streamed line by line into the flow's logs.

Retries are for transient failures only: a stage whose last output lines show a lost connection (MLflow's HTTP
API, S3) is retried; any other non-zero exit (bad input, a refused LoRA, a diverged run) fails the task at once
with the stage, its exit code and its last lines.

    umo_pipeline(overrides={"train.learning_rate": 2e-4})   # params.yaml is updated, like `dvc exp run -S`
    reevaluate_champion(benchmark="xverse", path="benchmarks/xverse.json")
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

import yaml
from PIL import Image
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed

from umo.config import load_config, write_overrides

# The gate stage's record in dvc.yaml, turned into the `umo-gate` artifact.
GATE_RECORD = "artifacts/registry/gate.json"
TAIL_LINES = 40

# A failure is transient when its last lines show that MLflow's HTTP API or the S3 endpoint could not be
# reached or dropped the connection (requests / urllib3 / botocore wordings). Everything else is deterministic.
TRANSIENT = re.compile(
    r"Connection refused|ConnectionError|ConnectionResetError|Connection reset by peer|RemoteDisconnected"
    r"|Max retries exceeded|Failed to establish a new connection|Read timed out|ConnectTimeout|ReadTimeout"
    r"|Could not connect to the endpoint URL|EndpointConnectionError|Temporary failure in name resolution"
    r"|503 Service Unavailable|502 Bad Gateway|504 Gateway Time-out|SlowDown"
)


class StageFailed(RuntimeError):
    """A stage's command exited non-zero; `transient` says whether a retry may help."""

    def __init__(self, stage: str, returncode: int, tail: list[str]):
        self.stage, self.returncode, self.tail = stage, returncode, tail
        self.transient = any(TRANSIENT.search(line) for line in tail)
        kind = "transient (connection), will be retried" if self.transient else "not retried"
        super().__init__(f"stage {stage!r} failed with exit code {returncode} ({kind}); last lines:\n"
                         + "\n".join(tail[-15:]))


def _env() -> dict[str, str]:
    """The stages' environment: this interpreter's scripts first (umo, dvc, accelerate) and unbuffered output,
    so a worker started without the virtualenv activated runs the same tools and its logs arrive as written."""
    bin_dir = str(Path(sys.executable).parent)
    return os.environ | {"PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1"}


def _stream(cmd: list[str], cwd: Path, stage: str) -> None:
    """Run `cmd`, every output line into the run's logger; StageFailed on a non-zero exit."""
    logger = get_run_logger()
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    logger.info("$ %s", " ".join(cmd))
    with subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1, errors="replace") as proc:
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            logger.info("[%s] %s", stage, line)
    if proc.returncode != 0:
        raise StageFailed(stage, proc.returncode, list(tail))


def _changed(target: str, cwd: Path) -> set[str]:
    """DVC's own verdict on `target` (a stage, or dvc.yaml for all of its stages): the stages whose deps, params
    or outs no longer hash as dvc.lock recorded them."""
    out = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", target], cwd=cwd, env=_env(),
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise StageFailed(target, out.returncode, (out.stdout + out.stderr).splitlines()[-TAIL_LINES:])
    return set(json.loads(out.stdout or "{}"))


def _retry_transient(task, task_run, state) -> bool:
    """retry_condition_fn: retry a StageFailed only when its output shows a connection failure."""
    try:
        state.result()
    except StageFailed as err:
        return err.transient
    except Exception:  # noqa: BLE001 - anything else is a bug or bad input: not retried
        return False
    return False


@task(task_run_name="{stage}", retries=2, retry_delay_seconds=60, retry_condition_fn=_retry_transient)
def run_stage(stage: str, project_dir: str, unchanged: bool = False) -> str:
    """`dvc repro --single-item <stage>`, unless DVC says the stage is up to date (then Skipped). unchanged: the
    flow's status of every stage, taken before any of them ran, already said so (no second `dvc status`)."""
    cwd = Path(project_dir)
    if unchanged or stage not in _changed(stage, cwd):
        get_run_logger().info("stage %s: inputs unchanged (dvc status), skipped", stage)
        return Completed(name="Skipped", message="inputs unchanged (dvc status)")
    _stream([sys.executable, "-m", "dvc", "repro", "--single-item", stage], cwd, stage)
    return "ran"


@task(task_run_name="{name}", retries=2, retry_delay_seconds=60, retry_condition_fn=_retry_transient)
def run_command(name: str, cmd: list[str], project_dir: str) -> None:
    """A umo command outside dvc.yaml (the champion's re-evaluation), with the stages' streaming and retries."""
    _stream(cmd, Path(project_dir), name)


@task
def apply_overrides(project_dir: str, overrides: dict[str, Any]) -> list[str]:
    """Write the flow's overrides into params.yaml (validated first; comments kept), like `dvc exp run -S`."""
    items = [f"{key}={json.dumps(value)}" for key, value in sorted(overrides.items())]
    write_overrides(Path(project_dir) / "params.yaml", items)
    get_run_logger().info("params.yaml: %s", ", ".join(items))
    return items


def _publish_evaluation(cwd: Path, report: Path, key: str) -> None:
    report_md = cwd / report / "report.md"
    if report_md.is_file():
        create_markdown_artifact(key=key, markdown=report_md.read_text(),
                                 description=f"{report}: base vs candidate (vs champion), judge-scored")


def _publish_matching(cwd: Path, report: Path, key: str, height: int = 160) -> None:
    """The pictures of the judge's matching for the items the report draws in grids/ (most improved, most
    regressed; else its first two items), base and candidate, as one markdown artifact with the pictures inline (JPEG data URIs, so the
    flow run shows them whatever the report folder's host)."""
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


def _publish_gate(cwd: Path) -> None:
    record = cwd / GATE_RECORD
    if not record.is_file():
        return
    d = json.loads(record.read_text())
    rows = "\n".join(f"| {name} | {detail} |" for name, detail in d["rules"].items())
    verdict = "PASSED: champion" if d["passed"] else "FAILED: not promoted"
    create_markdown_artifact(
        key="umo-gate",
        markdown=f"## Gate: {d['model']} version {d['version']}: {verdict}\n\n"
                 f"Champion before: {d['champion_before'] or 'none'}\n\n| rule | result |\n|---|---|\n{rows}\n",
        description="the approval gate's decision (registry.gate policy)",
    )


def _stage_names(cwd: Path) -> list[str]:
    dvc_yaml = cwd / "dvc.yaml"
    if not dvc_yaml.is_file():
        raise FileNotFoundError(f"{dvc_yaml}: not a umo checkout (project_dir must hold dvc.yaml)")
    return list((yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}))


@flow(name="umo-pipeline")
def umo_pipeline(overrides: dict[str, Any] | None = None, stages: list[str] | None = None,
                 project_dir: str = ".", retry_delay_seconds: float = 60.0) -> dict[str, str]:
    """The chain of dvc.yaml, stage by stage; returns {stage: "ran" | "skipped"}.

    overrides: dotted params.yaml keys, e.g. {"train.learning_rate": 2e-4} (validated before anything runs).
    stages: a subset, in dvc.yaml's order (default: all of them); upstream stages are not run for you.
    """
    cwd = Path(project_dir).resolve()
    known = _stage_names(cwd)
    todo = list(stages or known)
    unknown = [s for s in todo if s not in known]
    if unknown:
        raise ValueError(f"{cwd / 'dvc.yaml'}: no stage {unknown[0]!r} (stages: {', '.join(known)})")
    todo.sort(key=known.index)
    if overrides:
        apply_overrides(str(cwd), overrides)
    config = load_config(cwd / "params.yaml")  # also refuses a params.yaml that became invalid by hand
    stage_task = run_stage.with_options(retry_delay_seconds=retry_delay_seconds)
    # One `dvc status` of every stage first. Its verdict holds for a stage as long as nothing upstream has run in
    # this flow; after a stage ran, each later one asks DVC again (the run may have changed its inputs, or not).
    changed = _changed("dvc.yaml", cwd)
    done: dict[str, str] = {}
    for stage in todo:
        unchanged = stage not in changed and "ran" not in done.values()
        state = stage_task(stage, str(cwd), unchanged, return_state=True)
        state.result()  # a failed stage raises its StageFailed here: the flow stops and fails with it
        done[stage] = "skipped" if state.name == "Skipped" else "ran"
        if stage == "evaluate":
            _publish_evaluation(cwd, Path(config.eval.out), "umo-evaluation")
            _publish_matching(cwd, Path(config.eval.out), "umo-matching")
        elif stage == "evaluate_scaling":
            _publish_evaluation(cwd, Path(config.eval.scaling.out), "umo-scaling")
        elif stage == "gate":
            _publish_gate(cwd)
    get_run_logger().info("stages: %s", ", ".join(f"{s} {r}" for s, r in done.items()))
    return done


@flow(name="umo-champion-reevaluation")
def reevaluate_champion(project_dir: str = ".", benchmark: str | None = None, path: str | None = None,
                        out: str | None = None, retry_delay_seconds: float = 60.0) -> str:
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
    run_command.with_options(retry_delay_seconds=retry_delay_seconds)("evaluate-champion", cmd, str(cwd))
    _publish_evaluation(cwd, report, "umo-champion-evaluation")
    return str(cwd / report)
