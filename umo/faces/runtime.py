"""ONNX Runtime settings shared by the face models that run as ONNX (the detector, the judges): the session
options, and the execution providers that `faces.providers` asks for.

ONNX Runtime's thread pool spins (busy-waits) for new work after every run. Between two of its runs torch
generates or trains on the same cores, so the spinning threads take cycles from torch: measured on 2 cores, the
toy generator's sampling ran 1.44 s with spinning off against 1.91 to 2.42 s with it on, beside a detector and
two judges (`umo evaluate`'s pattern), and the face models themselves ran faster too (0.21 s against 0.30 s).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import onnxruntime as ort
import torch

log = logging.getLogger(__name__)

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
_reported: set[tuple[str, ...]] = set()  # fallbacks already logged: one line per process, not one per face model


def session_options() -> ort.SessionOptions:
    """Session options for a face model that shares the machine with torch: no spinning between runs."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def execution_providers(setting: str | Sequence[str] | None) -> list[str]:
    """The onnxruntime execution providers for a face model, in order of preference, from `faces.providers`.

    None: the CPU only. "auto": CUDA then the CPU where this onnxruntime has the CUDA provider, else the CPU.
    A list: its providers that this onnxruntime has, in order, then the CPU. A provider asked for that
    onnxruntime lacks (an explicit one, or CUDA by "auto" on a machine where torch sees a GPU, i.e. the CPU-only
    onnxruntime package on a GPU host) is left out, with one log line per process saying so.
    Raises ValueError for a name onnxruntime does not know.
    """
    if setting is None:
        return [CPU]
    available = ort.get_available_providers()
    if isinstance(setting, str):
        if setting != "auto":
            raise ValueError(f"faces.providers: expected 'auto' or a list of onnxruntime providers, got {setting!r}")
        if CUDA in available:
            return [CUDA, CPU]
        wanted = [CUDA] if torch.cuda.is_available() else []
    else:
        unknown = [p for p in setting if p not in ort.get_all_providers()]
        if unknown or not setting:
            raise ValueError(f"faces.providers: {unknown or 'an empty list'} is not an onnxruntime execution "
                             f"provider (known: {', '.join(ort.get_all_providers())})")
        wanted = list(dict.fromkeys(setting))
    chosen = [p for p in wanted if p in available]
    chosen += [] if CPU in chosen else [CPU]  # the fallback for what the others cannot run
    missing = tuple(p for p in wanted if p not in available)
    if missing and missing not in _reported:
        _reported.add(missing)
        log.warning("faces.providers: %s not available in this onnxruntime (it has %s); the face models run on %s%s",
                    ", ".join(missing), ", ".join(available), " then ".join(chosen),
                    " (CUDA needs the onnxruntime-gpu package)" if CUDA in missing else "")
    return chosen
