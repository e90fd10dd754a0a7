"""ONNX Runtime settings shared by the face models that run as ONNX (the detector, the judges).

ONNX Runtime's thread pool spins (busy-waits) for new work after every run. Between two of its runs torch
generates or trains on the same cores, so the spinning threads take cycles from torch: measured on 2 cores, the
toy generator's sampling ran 1.44 s with spinning off against 1.91 to 2.42 s with it on, beside a detector and
two judges (`umo evaluate`'s pattern), and the face models themselves ran faster too (0.21 s against 0.30 s).
"""

from __future__ import annotations

import onnxruntime as ort


def session_options() -> ort.SessionOptions:
    """Session options for a face model that shares the machine with torch: no spinning between runs."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options
