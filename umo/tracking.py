"""MLflow tracking for a stage's run (the one place besides registry.py that imports mlflow).

The tracking URI comes from the config, else $MLFLOW_TRACKING_URI, else a local SQLite store under
artifacts/mlflow (the embedded default). Credentials of a URI are never logged: `redact_uri` drops them.

Outages. A tracking server that goes away must not kill a training of hours, so `Tracker` writes through a spool:
a write that fails with a transient error (`is_transient`: no connection, a timeout, an HTTP 5xx) is appended to
a local JSON-lines file (`artifacts/mlflow_spool/<run_id>.jsonl`; images and artifacts are copied beside it, in
`<run_id>.files/`) with its original step and timestamp, and the call returns. While records wait, later writes
join them (their order is kept) and nothing is sent; at most every `probe_every` seconds `{uri}/health` is asked
(2 s timeout); once it answers, the spool is replayed in order and removed. Replaying is idempotent where MLflow
allows it: a metric with the same key, step, timestamp and value is stored once; params the run already has are
skipped; tags are set again; images and artifacts are uploaded again. A refusal (4xx: bad input, a param
changed) is not an outage: a live call raises it, a replay drops that record with an error in the log. `end()`
replays what waits; when the server is still away the spool stays, and `replay_spool` sends it later; a run
resumed with the same spool replays it first.

MLflow's client retries a failing request for minutes by default (7 retries with exponential backoff, 120 s
timeout). The Tracker's own calls run with MLFLOW_HTTP_REQUEST_MAX_RETRIES=1 and MLFLOW_HTTP_REQUEST_TIMEOUT=10
(`BOUNDED_HTTP`) unless the environment sets them: MLflow reads both per request, so they are put in os.environ
for the duration of the call and taken out after it (process-wide for that moment: another thread's MLflow call
at the same instant sees them too). A dead server then costs milliseconds (connection refused), a hung one
about 20 s once; after that only the probes run. Opening the run keeps MLflow's own retries (a server restarting
at launch is waited for).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import mlflow
import numpy as np
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException

from umo.failures import is_transient
from umo.io import shared_path

log = logging.getLogger(__name__)

DEFAULT_STORE = Path("artifacts/mlflow")
DEFAULT_SPOOL = Path("artifacts/mlflow_spool")  # <run_id>.jsonl and <run_id>.files/ (relative to the working folder)
BOUNDED_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
PROBE_TIMEOUT = 2.0  # seconds for one GET {uri}/health


def tracking_uri(configured: str | None) -> str:
    """config > $MLFLOW_TRACKING_URI > sqlite:///artifacts/mlflow/mlflow.db (relative to the working folder)."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store = shared_path(DEFAULT_STORE)
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(store / 'mlflow.db').resolve()}"


def redact_uri(uri: str) -> str:
    """The URI without user name and password (for logs).

    >>> redact_uri("https://bob:s3cret@mlflow.example.com/path")
    'https://mlflow.example.com/path'
    """
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def redact_text(text: str) -> str:
    """Any URL's user name and password cut out of a message (errors quote the URLs they failed on).

    >>> redact_text("API request to https://bob:s3cret@mlflow.example.com/api failed")
    'API request to https://mlflow.example.com/api failed'
    """
    return re.sub(r"(\w+://)[^/\s@]*@", r"\1", text)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> {"train.learning_rate": 1e-4, ...} (lists stay values).

    >>> flatten({"a": {"b": 1, "c": [2, 3]}, "d": None})
    {'a.b': 1, 'a.c': [2, 3], 'd': None}
    """
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@contextmanager
def bounded_http() -> Iterator[None]:
    """MLflow's HTTP retries and timeout bounded (BOUNDED_HTTP) within the block, where the environment does not
    set them already; os.environ is as before afterwards."""
    added = [name for name in BOUNDED_HTTP if name not in os.environ]
    for name in added:
        os.environ[name] = BOUNDED_HTTP[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def server_answers(uri: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """GET {uri}/health (without the URI's credentials): True when the server answers below 500. A URI that is not
    http(s) (a SQLite or file store, databricks) has no such probe: True, and the replay itself tells."""
    parts = urlsplit(redact_uri(uri))
    if parts.scheme not in ("http", "https"):
        return True
    try:
        with urllib.request.urlopen(f"{urlunsplit(parts).rstrip('/')}/health", timeout=timeout) as response:
            return response.status < 500
    except urllib.error.HTTPError as err:  # it answers: a 401 or 404 from a proxy in front means the host is up
        return err.code < 500
    except (OSError, http.client.HTTPException):
        return False


# ------------------------------------------------------------------------------------------------ the spool


def files_dir(spool: Path) -> Path:
    """Where the spool's images and artifacts are kept: <spool without .jsonl>.files/ beside it."""
    return spool.with_suffix(".files")


def read_spool(spool: Path) -> list[dict[str, Any]]:
    """The spool's records in order ([] when there is no spool). A last line cut short (the process died while
    appending it) is dropped with a warning; a broken line elsewhere is an error."""
    if not spool.is_file():
        return []
    lines = spool.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number != len(lines):
                raise ValueError(f"{spool}: line {number} is not a JSON record ({err})") from err
            log.warning("%s: the last line was cut short (the process died while writing it): dropped", spool)
    return records


def append_record(spool: Path, record: dict[str, Any]) -> None:
    """One record at the spool's end, flushed to disk (it must survive the process)."""
    spool.parent.mkdir(parents=True, exist_ok=True)
    with open(spool, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def keep_records(spool: Path, records: list[dict[str, Any]], done: list[dict[str, Any]]) -> None:
    """The spool rewritten to `records` (atomically: a temporary file renamed over it), or removed when none are
    left; then the files of the `done` records are deleted (after the rewrite, so a crash between the two leaves
    records whose files exist)."""
    if records:
        tmp = spool.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, spool)
    else:
        spool.unlink(missing_ok=True)
    for record in done:
        if "file" in record:
            path = files_dir(spool) / record["file"]
            shutil.rmtree(path.parent if record["op"] == "artifact" else path, ignore_errors=True)
    if not records:
        shutil.rmtree(files_dir(spool), ignore_errors=True)


def send_params(client: mlflow.MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    """The params the run does not have yet, in batches of 100 (the REST API's limit); existing keys are skipped."""
    existing = client.get_run(run_id).data.params
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    for i in range(0, len(new), 100):
        client.log_batch(run_id, params=new[i:i + 100])


def send_record(client: mlflow.MlflowClient, record: dict[str, Any], folder: Path) -> None:
    """One spooled record to MLflow (the same calls as the Tracker's own); `folder`: the spool's files."""
    run_id, op = record["run_id"], record["op"]
    if op == "metrics":
        client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in record["metrics"]])
    elif op == "params":
        send_params(client, run_id, record["params"])
    elif op == "tags":
        for key, value in record["tags"].items():
            client.set_tag(run_id, key, value)
    elif op == "image":
        client.log_image(run_id, np.load(folder / record["file"]), key=record["key"], step=record["step"],
                         timestamp=record["timestamp"])
    elif op == "artifact":
        client.log_artifact(run_id, str(folder / record["file"]), record["artifact_path"])
    elif op == "inputs":
        client.log_inputs(run_id, datasets=[dataset_input(d, record["context"]) for d in record["datasets"]])
    elif op == "status":
        client.update_run(run_id, status=record["status"])
    elif op == "end":
        client.set_terminated(run_id, status=record["status"], end_time=record["end_time"])
    else:
        raise ValueError(f"spool record with an unknown op {op!r} (expected metrics, params, tags, image, "
                         f"artifact, inputs, status or end): {record}")


def dataset_input(record: Mapping[str, Any], context: str) -> DatasetInput:
    """A data set (umo.io.dataset_record: name, path, digest, items) as an MLflow run input of `context`
    (training, evaluation): the run page's Datasets column, with the digest and the number of items."""
    profile = json.dumps({"items": record["items"]}, sort_keys=True)
    source = json.dumps({"uri": str(record["path"])})
    dataset = Dataset(record["name"], record["digest"], "local", source, profile=profile)
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])


def _git(root: Path, *args: str) -> str | None:
    """`git <args>`'s output in `root` (stripped), None when git fails there (not a checkout, no git)."""
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def git_commit(root: Path = Path(".")) -> str:
    """HEAD's commit, with `-dirty` when tracked files differ from it; "unknown" outside a git checkout."""
    head, dirty = _git(root, "rev-parse", "HEAD"), _git(root, "status", "--porcelain", "--untracked-files=no")
    if head is None or dirty is None:
        return "unknown"
    return head + ("-dirty" if dirty else "")


def source_tags(entry_point: str, root: Path = Path(".")) -> dict[str, str]:
    """MLflow's source tags for a run started by `entry_point` (e.g. "umo train"): the git commit (without the
    `-dirty` mark, which goes to `umo.git_dirty`), the repository URL without credentials, the branch, type JOB,
    and the DVC stage when DVC runs the command (`dvc.stage`, from DVC_STAGE)."""
    commit = git_commit(root)
    tags = {"mlflow.source.type": "JOB", "mlflow.source.name": entry_point,
            "mlflow.source.git.commit": commit.removesuffix("-dirty"),
            "umo.git_dirty": str(commit.endswith("-dirty")).lower()}
    url, branch = _git(root, "remote", "get-url", "origin"), _git(root, "rev-parse", "--abbrev-ref", "HEAD")
    if url:
        tags["mlflow.source.git.repoURL"] = redact_uri(url)
    if branch and branch != "HEAD":
        tags["mlflow.source.git.branch"] = branch
    if os.environ.get("DVC_STAGE"):
        tags["dvc.stage"] = os.environ["DVC_STAGE"]
    return tags


def replay_records(client: mlflow.MlflowClient, spool: Path) -> int:
    """Send the spool's records in order; stop at the first transient failure. The spool keeps what was not
    sent (removed when all was). A record MLflow refuses (4xx) or whose file is gone is dropped with an error.
    Returns the number of records left."""
    records = read_spool(spool)
    done: list[dict[str, Any]] = []
    for i, record in enumerate(records):
        try:
            with bounded_http():
                send_record(client, record, files_dir(spool))
        except FileNotFoundError as err:
            log.error("spooled %s record of run %s dropped: its file is gone (%s)", record["op"], record["run_id"],
                      err)
        except MlflowException as err:
            if is_transient(err):
                keep_records(spool, records[i:], done)
                return len(records) - i
            log.error("MLflow refused a spooled %s record of run %s (dropped): %s", record["op"], record["run_id"],
                      redact_text(str(err))[:500])
        except Exception as err:
            if not is_transient(err):
                raise
            keep_records(spool, records[i:], done)
            return len(records) - i
        done.append(record)
    keep_records(spool, [], done)
    return 0


def replay_spool(uri: str, spool_path: str | Path) -> int:
    """Send a spool that a Tracker left (the server was away when its run ended) to the server at `uri`, in order,
    and remove it. Returns the number of records still waiting (0: all sent; more: the server is still away)."""
    spool = Path(spool_path)
    total = len(read_spool(spool))
    if not total:
        return 0
    left = replay_records(mlflow.MlflowClient(tracking_uri=uri), spool)
    if left:
        log.warning("MLflow at %s is unreachable: %d of %d spooled records still wait in %s", redact_uri(uri),
                    left, total, spool)
    else:
        log.info("replayed %d spooled records from %s to MLflow at %s", total, spool, redact_uri(uri))
    return left


# ------------------------------------------------------------------------------------------------ the run


class Tracker:
    """One MLflow run. Construct it on the main process only; every method is cheap to call, and a write never
    fails for an outage of the server (see the module docstring: the spool).

    run_id: continue that run (a resumed training) instead of starting a new one; its spool, if one was left, is
    replayed first. spool: the spool file (default artifacts/mlflow_spool/<run_id>.jsonl). probe_every: seconds
    between two probes of a server that is away.
    """

    def __init__(self, *, uri: str, experiment: str, run_name: str | None = None, run_id: str | None = None,
                 tags: Mapping[str, str] | None = None, spool: str | Path | None = None,
                 probe_every: float = 10.0) -> None:
        self.uri = uri
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.probe_every = probe_every
        self._down_since: float | None = None  # time.monotonic() when the outage began
        self._next_probe = 0.0
        self._monitor = None  # start_system_metrics
        resumed = run_id is not None
        if run_id is None:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
            run_id = self.client.create_run(exp_id, run_name=run_name, tags=dict(tags or {})).info.run_id
        self.run_id = run_id
        self.spool = Path(spool or shared_path(DEFAULT_SPOOL) / f"{run_id}.jsonl").resolve()
        self.pending = len(read_spool(self.spool))  # records in the spool, waiting for the server
        if self.pending:  # left by an earlier process (its run ended while the server was away)
            log.info("%d MLflow records wait in %s: replaying them", self.pending, self.spool)
            self._outage(None)
            self._recover(force=True)
            if self.pending:
                log.warning("MLflow at %s is unreachable: %d records still wait in %s (probed every %g s)",
                            redact_uri(uri), self.pending, self.spool, probe_every)
        if resumed:  # after the replay: the `end` the last process spooled is undone
            self._write(lambda: self.client.update_run(run_id, status="RUNNING"),
                        lambda: {"op": "status", "status": "RUNNING"})
        log.info("MLflow run %s at %s", run_id, redact_uri(uri))

    # -------------------------------------------------------------------------------------------- writes

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params the run does not have yet (values as text, at most 6000 characters)."""
        texts = {k: str(v)[:6000] for k, v in params.items()}
        self._write(lambda: send_params(self.client, self.run_id, texts), lambda: {"op": "params", "params": texts})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        rows = [(k, float(v), now, step) for k, v in metrics.items()]
        self._write(lambda: self.client.log_batch(self.run_id, metrics=[Metric(*row) for row in rows]),
                    lambda: {"op": "metrics", "metrics": rows})

    def log_image(self, image: np.ndarray, *, key: str, step: int) -> None:
        """image: (H, W, 3) uint8, logged under `key` at `step` (MLflow's image series: the UI's step slider)."""
        now = int(time.time() * 1000)

        def record() -> dict[str, Any]:
            name = f"{uuid.uuid4().hex}.npy"
            files_dir(self.spool).mkdir(parents=True, exist_ok=True)
            np.save(files_dir(self.spool) / name, image)
            return {"op": "image", "file": name, "key": key, "step": step, "timestamp": now}

        self._write(lambda: self.client.log_image(self.run_id, image, key=key, step=step, timestamp=now), record)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file or folder as the run's artifact; while the server is away a copy of it waits in the spool."""
        path = Path(path)

        def record() -> dict[str, Any]:
            name = f"{uuid.uuid4().hex}/{path.name}"
            copy = files_dir(self.spool) / name
            copy.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                shutil.copytree(path, copy)
            else:
                shutil.copy2(path, copy)
            return {"op": "artifact", "file": name, "artifact_path": artifact_path}

        self._write(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path), record)

    def log_inputs(self, datasets: list[Mapping[str, Any]], context: str) -> None:
        """Data sets (umo.io.dataset_record) as the run's inputs of `context` (training, evaluation)."""
        rows = [dict(d) for d in datasets]
        self._write(lambda: self.client.log_inputs(self.run_id, datasets=[dataset_input(d, context) for d in rows]),
                    lambda: {"op": "inputs", "datasets": rows, "context": context})

    def start_system_metrics(self, every: float) -> None:
        """MLflow's system metrics (system/cpu_utilization_percentage, system/system_memory_usage_megabytes, GPU
        utilisation and memory where there is a GPU, ...) sampled every `every` seconds by MLflow's own monitor
        thread until `end`, which adds a last sample. Its samples are not spooled: while the server is away they are lost (the monitor
        logs a warning), the training's own records are not."""
        # lazy: the monitor imports psutil (and pynvml on GPU hosts); only training samples the machine
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=every, resume_logging=True,
                                             tracking_uri=self.uri)
        self._monitor.start()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        values = {k: str(v) for k, v in tags.items()}

        def send() -> None:
            for k, v in values.items():
                self.client.set_tag(self.run_id, k, v)

        self._write(send, lambda: {"op": "tags", "tags": values})

    def end(self, status: str = "FINISHED") -> None:
        """Replay what waits (probing the server now) and end the run with `status`; when the server is still away,
        the spool (the status included) stays for `replay_spool`."""
        if self._monitor is not None:
            self._monitor.finish()
            try:  # one last sample, so that a run shorter than the interval has one too
                self._monitor.collect_metrics()
                self._monitor.publish_metrics(self._monitor.aggregate_metrics())
                self._monitor.mlflow_logger.flush()
            except Exception as err:  # an outage: system samples are not spooled (start_system_metrics)
                log.warning("the last system metrics sample of run %s was not logged: %s", self.run_id,
                            redact_text(str(err))[:300])
            self._monitor = None
        if self.pending:
            self._recover(force=True)
        now = int(time.time() * 1000)
        self._write(lambda: self.client.set_terminated(self.run_id, status=status, end_time=now),
                    lambda: {"op": "end", "status": status, "end_time": now})
        if self.pending:
            log.warning("MLflow at %s is still unreachable: %d records of run %s (its end included) are kept in %s; "
                        "umo.tracking.replay_spool(uri, path) sends them", redact_uri(self.uri), self.pending,
                        self.run_id, self.spool)

    # -------------------------------------------------------------------------------------------- reads

    def last_step(self, key: str) -> int:
        """The last step logged for metric `key` in this run (0: none), the spooled ones included."""
        with bounded_http():
            logged = max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=0)
        spooled = [row[3] for r in read_spool(self.spool) if r["op"] == "metrics" and r["run_id"] == self.run_id
                   for row in r["metrics"] if row[0] == key]
        return max([logged, *spooled])

    # -------------------------------------------------------------------------------------------- the outage

    def _write(self, send: Callable[[], None], record: Callable[[], dict[str, Any]]) -> None:
        """send() now, or, while records wait or when it fails for an outage, record() into the spool."""
        if self.pending:
            self._recover()
        if not self.pending:
            try:
                with bounded_http():
                    send()
                return
            except Exception as err:
                if not is_transient(err):
                    raise
                self._outage(err)
        self._spool(record())

    def _spool(self, record: dict[str, Any]) -> None:
        append_record(self.spool, {"run_id": self.run_id, **record})
        self.pending += 1

    def _outage(self, err: BaseException | None) -> None:
        """A write failed for an outage (err), or records were left by an earlier process (None): say it once."""
        if self._down_since is None:
            self._down_since = time.monotonic()
            if err is not None:
                log.warning("MLflow at %s is unreachable (%s: %s); training goes on, its records wait in %s and are "
                            "sent when the server answers again (probed every %g s)", redact_uri(self.uri),
                            type(err).__name__, redact_text(str(err))[:300], self.spool, self.probe_every)
        self._next_probe = time.monotonic() + self.probe_every

    def _recover(self, force: bool = False) -> None:
        """When a probe is due (or forced) and the server answers: replay the spool."""
        if not force and time.monotonic() < self._next_probe:
            return
        self._next_probe = time.monotonic() + self.probe_every
        if not server_answers(self.uri):
            return
        sent = self.pending
        self.pending = replay_records(self.client, self.spool)
        if self.pending == 0:
            log.info("MLflow at %s answers again after %.0f s: %d spooled records of run %s replayed",
                     redact_uri(self.uri), time.monotonic() - (self._down_since or time.monotonic()), sent,
                     self.run_id)
            self._down_since = None
