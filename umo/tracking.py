"""MLflow tracking for a stage's run (the one place besides registry.py that imports mlflow).

The tracking URI comes from the config, else $MLFLOW_TRACKING_URI, else a local SQLite store under
artifacts/mlflow (the embedded default). Credentials of a URI are never logged: `redact_uri` drops them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import mlflow
import numpy as np
from mlflow.entities import Metric, Param

log = logging.getLogger(__name__)

DEFAULT_STORE = Path("artifacts/mlflow")


def tracking_uri(configured: str | None) -> str:
    """config > $MLFLOW_TRACKING_URI > sqlite:///artifacts/mlflow/mlflow.db (relative to the working folder)."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    DEFAULT_STORE.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(DEFAULT_STORE / 'mlflow.db').resolve()}"


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


class Tracker:
    """One MLflow run. Construct it on the main process only; every method is cheap to call.

    run_id: continue that run (a resumed training) instead of starting a new one.
    """

    def __init__(self, *, uri: str, experiment: str, run_name: str | None = None, run_id: str | None = None,
                 tags: Mapping[str, str] | None = None) -> None:
        self._mlflow = mlflow
        self.uri = uri
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        if run_id is None:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
            run = self.client.create_run(exp_id, run_name=run_name, tags=dict(tags or {}))
            run_id = run.info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        log.info("MLflow run %s at %s", run_id, redact_uri(uri))

    def log_params(self, params: Mapping[str, Any]) -> None:
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):  # the REST API takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=new[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def last_step(self, key: str) -> int:
        """The last step logged for metric `key` in this run (0: none)."""
        return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=0)

    def log_image(self, image: np.ndarray, *, key: str, step: int) -> None:
        """image: (H, W, 3) uint8, logged under `key` at `step` (MLflow's image series: the UI's step slider)."""
        self.client.log_image(self.run_id, image, key=key, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
