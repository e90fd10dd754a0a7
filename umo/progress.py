"""Progress of long work, readable by a person at a terminal and by an orchestrator.

At a terminal it is tqdm's bar. Anywhere else (a Prefect worker, CI, a log file) a bar's carriage returns become one
log line per refresh, so `progress` logs one line every $UMO_PROGRESS_EVERY seconds (default 30) instead:
"train: 120/400 step (30%), 2.10 step/s, 2m13s left". When $UMO_PROGRESS_FILE is set, it also keeps that file
(JSON: desc, n, total, fraction, rate) up to date, atomically, at most once a second: the Prefect flow turns it
into a progress artifact.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from umo.io import atomic_write_json

log = logging.getLogger(__name__)

PROGRESS_FILE_ENV = "UMO_PROGRESS_FILE"
PROGRESS_EVERY_ENV = "UMO_PROGRESS_EVERY"


def _duration(seconds: float) -> str:
    """
    >>> _duration(133.2), _duration(7322), _duration(4)
    ('2m13s', '2h02m', '4s')
    """
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class LoggedProgress:
    """tqdm's small API (update, set_postfix, close, n) as throttled log lines and a progress file."""

    def __init__(self, *, total: int | None, desc: str, unit: str = "it", initial: int = 0,
                 every: float | None = None, file: str | Path | None = None) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.every = float(os.environ.get(PROGRESS_EVERY_ENV, "30")) if every is None else every
        self.file = Path(file) if file else None
        self.postfix: dict[str, Any] = {}
        self._start, self._start_n = time.monotonic(), initial
        self._logged = self._written = -float("inf")
        self._write(force=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._logged >= self.every:
            self._logged = now
            log.info("%s", self.line())
        self._write()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kw: Any) -> None:  # noqa: ARG002
        self.postfix = dict(ordered_dict or {}) | kw

    def line(self) -> str:
        elapsed = time.monotonic() - self._start
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        left = f", {_duration((self.total - self.n) / rate)} left" if self.total and rate > 0 else ""
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        return f"{self.desc}: {done} {self.unit}{pct}, {rate:.2f} {self.unit}/s{left}{extra}"

    def _write(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.file is None or (not force and now - self._written < 1.0 and self.n != self.total):
            return
        self._written = now
        elapsed = now - self._start
        atomic_write_json(self.file, {"desc": self.desc, "n": self.n, "total": self.total, "unit": self.unit,
                                      "fraction": self.n / self.total if self.total else None,
                                      "rate": (self.n - self._start_n) / elapsed if elapsed > 0 else None})

    def close(self) -> None:
        log.info("%s", self.line())
        self._write(force=True)

    def __enter__(self) -> "LoggedProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(*, total: int | None, desc: str, unit: str = "it", initial: int = 0, disable: bool = False,
             stage: bool = True):
    """tqdm at a terminal; a LoggedProgress elsewhere or when an orchestrator asked for a progress file.
    stage=False: a bar within the stage's own (one per video, say) that never writes the orchestrator's file."""
    if disable:
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=True)
    file = os.environ.get(PROGRESS_FILE_ENV) if stage else None
    if sys.stderr.isatty() and not file:
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True)
    return LoggedProgress(total=total, desc=desc, unit=unit, initial=initial, file=file)
