"""Write torch face models as ONNX files with the signatures insightface's model router recognizes.

Real users bring insightface model packs; tests and the toy world bring tiny models of their own. Both go
through exactly the same loading code (insightface.model_zoo.get_model), so what we export here must look,
to that router, like the real thing:
- a recognizer: one input (N, 3, S, S) with S >= 112 and S % 16 == 0, one output (N, D), RGB in [-1, 1]
  (insightface feeds (pixel - 127.5) / 127.5 unless the graph starts with Sub and Mul nodes);
- a detector: SCRFD's layout (see export_detector_onnx).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

# The legacy TorchScript exporter needs no onnxscript; it is deprecated in torch 2.9+ but present in the
# pinned 2.13, and its node names ("/conv/Conv") never trip insightface's mxnet-normalization heuristic.
_EXPORT_KW = dict(dynamo=False, do_constant_folding=True, opset_version=17)


def export_recognizer_onnx(model: nn.Module, path: str | Path, *, image_size: int = 112) -> Path:
    """Export a face embedder (N, 3, S, S) RGB in [-1, 1] -> (N, D) as an insightface-routable recognizer."""
    if image_size < 112 or image_size % 16:
        raise ValueError(f"recognizer image_size must be >= 112 and a multiple of 16, got {image_size}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    dummy = torch.zeros(1, 3, image_size, image_size)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(tmp),
            input_names=["input"],
            output_names=["embedding"],
            dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
            **_EXPORT_KW,
        )
    tmp.replace(path)
    model.train(was_training)
    return path
