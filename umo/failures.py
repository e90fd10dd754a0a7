"""Which failures are worth a retry, decided from the exception itself, never from log text.

A stage's process that fails writes a failure record (`record`) into $UMO_FAILURE_DIR, when the orchestrator set
it: the exception's type, its message and `transient`. The Prefect flow reads the records of a failed stage and
retries it only when every record says transient. Transient means the failure came from outside the job and
may be gone a minute later:

- a connection that could not be made, was reset or timed out (Python's `ConnectionError`, `TimeoutError`,
  requests' `ConnectionError` / `Timeout`, urllib3's connection and protocol errors, botocore's endpoint and
  timeout errors);
- an HTTP 5xx answer from MLflow's REST API (`RestException` with a 5xx status) or S3 (`ClientError` with a
  5xx status, or S3's `SlowDown`);
- the process was asked to stop (SIGTERM: a preempted host, a worker shut down).

Everything else (bad input, a refused LoRA, a diverged run, a 4xx answer, a bug) is deterministic: a retry would
fail the same way. The cause chain (`__cause__`, `__context__`) is walked, because the libraries wrap: MLflow
raises an `MlflowException` from requests' `ConnectionError`.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from umo.io import atomic_write_json

FAILURE_DIR_ENV = "UMO_FAILURE_DIR"

# S3 error codes that mean "try again later" (botocore ClientError.response["Error"]["Code"]).
S3_RETRYABLE = {"SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable",
                "Throttling", "ThrottlingException"}


class Interrupted(RuntimeError):
    """The process received SIGTERM (a preempted host, a worker that shuts down): transient by definition."""


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and all(exc is not s for s in seen):
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _one_is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError, http.client.HTTPException, Interrupted)):
        return True  # ConnectionRefused/Reset/Aborted, RemoteDisconnected, IncompleteRead
    requests = sys.modules.get("requests")
    if requests is not None and isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                                                 requests.exceptions.RetryError)):  # RetryError: 5xx until give-up
        return True
    if requests is not None and isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
        return exc.response.status_code >= 500
    urllib3 = sys.modules.get("urllib3")
    if urllib3 is not None and isinstance(exc, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.TimeoutError,
                                                urllib3.exceptions.ProtocolError, urllib3.exceptions.MaxRetryError)):
        return True
    botocore = sys.modules.get("botocore.exceptions")
    if botocore is not None:
        if isinstance(exc, (botocore.EndpointConnectionError, botocore.ConnectionClosedError,
                            botocore.ConnectTimeoutError, botocore.ReadTimeoutError)):
            return True
        if isinstance(exc, botocore.ClientError):
            response = exc.response or {}
            status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
            return status >= 500 or (response.get("Error") or {}).get("Code") in S3_RETRYABLE
    mlflow = sys.modules.get("mlflow.exceptions")
    if mlflow is not None and isinstance(exc, mlflow.RestException):  # an answer of the server: its status says
        return exc.get_http_status_code() >= 500
    if mlflow is not None and isinstance(exc, mlflow.MlflowException):
        # A server's non-JSON 503 / 504 (a proxy) comes as these codes; a bare MlflowException defaults to
        # INTERNAL_ERROR whatever its cause, so that code alone proves nothing (its cause chain decides).
        return exc.error_code in ("TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED")
    return False


def is_transient(exc: BaseException) -> bool:
    """True when `exc` (or anything in its cause chain) is a transient failure (see the module docstring)."""
    return any(_one_is_transient(e) for e in _chain(exc))


def describe(exc: BaseException) -> dict[str, Any]:
    """The failure record of `exc`: type, message, transient, the cause chain's types, and the traceback's tail."""
    return {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc)[:2000],
        "transient": is_transient(exc),
        "chain": [f"{type(e).__module__}.{type(e).__qualname__}" for e in _chain(exc)],
        "traceback": "".join(traceback.format_exception(exc))[-4000:],
        "pid": os.getpid(),
        "rank": int(os.environ.get("RANK", "0")),
    }


def record(exc: BaseException) -> Path | None:
    """Write `exc`'s failure record into $UMO_FAILURE_DIR (one file per process); None when it is not set."""
    folder = os.environ.get(FAILURE_DIR_ENV)
    if not folder:
        return None
    path = Path(folder) / f"failure-{os.getpid()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, describe(exc))
    return path


def read_records(folder: str | Path) -> list[dict[str, Any]]:
    """The failure records that a stage's processes wrote into `folder`, oldest first."""
    files = sorted(Path(folder).glob("failure-*.json"), key=lambda p: p.stat().st_mtime)
    return [json.loads(p.read_text()) for p in files]


def raise_on_sigterm() -> None:
    """Turn SIGTERM into `Interrupted` (a transient failure, recorded like any other) in the main thread."""

    def handler(signum, frame):  # noqa: ARG001 - signal's signature
        raise Interrupted(f"received signal {signal.Signals(signum).name}: stopped from outside (host preempted "
                          "or worker shut down)")

    signal.signal(signal.SIGTERM, handler)
