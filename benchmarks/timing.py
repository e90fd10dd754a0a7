"""Wall-clock timing shared by the benchmarks: CUDA work is synchronized before each reading."""

from __future__ import annotations

import time
from collections import defaultdict

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Clock:
    """Accumulates wall time per stage; `with clock("embed"): ...`. Stages may nest (a sub-stage's time also counts
    in its enclosing stage)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: dict[str, float] = defaultdict(float)
        self._open: list[list] = []  # [stage, start] of each stage entered and not yet left, innermost last

    def __call__(self, stage: str) -> "Clock":
        self._open.append([stage, None])
        return self

    def __enter__(self) -> None:
        sync(self.device)
        self._open[-1][1] = time.perf_counter()

    def __exit__(self, *exc) -> None:
        sync(self.device)
        stage, start = self._open.pop()
        self.times[stage] += time.perf_counter() - start
