"""Real servers for the tests, on 127.0.0.1 and free ports, each stopped by its own PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; log {log}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s; log {log}:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen, timeout: float = 20.0, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
    """Each signal in turn to the PID we started (waiting `timeout` after each), then SIGKILL if it lingers."""
    for sig in signals:
        if proc.poll() is not None:
            break
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            continue
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout)


class _Server:
    """A server subprocess on 127.0.0.1 and a free port, logging under `root`, stopped by its own PID."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def _launch(self, cmd: list[str], log_name: str, health: str, env: dict | None = None) -> None:
        log = self.root / log_name
        self.proc = subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env)
        wait_http(f"{self.uri}{health}", self.proc, log)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


class MlflowServer(_Server):
    """`mlflow server` with a SQLite store and local artifacts, restartable on the same port and store."""

    def start(self) -> "MlflowServer":
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]
        self._launch(cmd, "server.log", "/health", os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        return self


class MotoServer(_Server):
    """moto's S3 API server (`moto_server`) on 127.0.0.1 (S3's rules: multipart parts of at least 5 MiB)."""

    def start(self, *, check_credentials: bool = False) -> "MotoServer":
        """check_credentials: moto's IAM authentication from the first request on (an unknown access key is
        refused, as AWS refuses it); by default any key is accepted."""
        cmd = [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)]
        env = os.environ | {"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if check_credentials else None
        self._launch(cmd, "moto.log", "/moto-api/data.json", env)
        return self

    def check_credentials(self, on: bool) -> None:
        """Turn moto's IAM authentication on (from the next request: an unknown access key or a wrong secret
        is refused, as AWS refuses them) or off (any key accepted) on the running server."""
        req = urllib.request.Request(f"{self.uri}/moto-api/reset-auth", data=b"0" if on else b"inf", method="POST",
                                     headers={"Content-Type": "text/plain"})  # moto reads the raw body
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200, r.read()


class PrefectServer(_Server):
    """`prefect server start` (SQLite, no UI) with its own PREFECT_HOME; `env()` is what its clients need."""

    def env(self, **extra: str) -> dict[str, str]:
        return os.environ | {"PREFECT_HOME": str(self.root / "home"), "PREFECT_API_URL": f"{self.uri}/api",
                             "PREFECT_SERVER_ANALYTICS_ENABLED": "false"} | extra

    def start(self) -> "PrefectServer":
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port),
               "--no-ui", "--analytics-off"]
        db = f"sqlite+aiosqlite:///{self.root / 'prefect.db'}"
        self._launch(cmd, "server.log", "/api/health", self.env(PREFECT_API_DATABASE_CONNECTION_URL=db))
        return self


class WebhookSink:
    """An HTTP server on 127.0.0.1 (a thread of this process) that keeps every request's JSON body: the
    receiving end of an alert."""

    def __init__(self) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.received: list[dict] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    received.append(json.loads(body))
                except ValueError:
                    received.append({"raw": body.decode(errors="replace")})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait(self, timeout: float = 60.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while not self.received and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.received

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def moto_s3(root: Path, *, key: str, secret: str, bucket: str) -> Iterator[MotoServer]:
    """moto's S3 server, with boto3's standard chain pointed at it for the block (these credentials, a region, its
    endpoint; no profile, session token or general endpoint of the caller's) and `bucket` created in it."""
    import boto3  # only the S3 tests need it
    import pytest  # its MonkeyPatch: every variable back as it was, even when the block fails

    server = MotoServer(root).start()
    mp = pytest.MonkeyPatch()
    try:
        for k, v in {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_ENDPOINT_URL_S3": server.uri}.items():
            mp.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            mp.delenv(k, raising=False)
        boto3.client("s3").create_bucket(Bucket=bucket)
        yield server
    finally:
        mp.undo()
        server.stop()
