"""Wall-clock timing shared by the benchmarks: CUDA work is synchronized before each reading."""

from __future__ import annotations

import time
from collections import defaultdict

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Clock:
    """Accumulates wall time per stage; `with clock("embed"): ...`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: dict[str, float] = defaultdict(float)

    def __call__(self, stage: str) -> "Clock":
        self._stage = stage
        return self

    def __enter__(self) -> None:
        sync(self.device)
        self._t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.times[self._stage] += time.perf_counter() - self._t0
