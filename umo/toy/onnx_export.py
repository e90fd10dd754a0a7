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

import onnx
import torch
from torch import nn

# The legacy TorchScript exporter needs no onnxscript; it is deprecated in torch 2.9+ but present in the
# pinned 2.13, and its node names ("/conv/Conv") never trip insightface's mxnet-normalization heuristic.
_EXPORT_KW = dict(dynamo=False, do_constant_folding=True, opset_version=17)


def export_recognizer_onnx(model: nn.Module, path: str | Path, *, image_size: int = 112,
                           metadata: dict[str, str] | None = None) -> Path:
    """Export a face embedder (N, 3, S, S) RGB in [-1, 1] -> (N, D) as an insightface-routable recognizer.

    metadata: written as the model's metadata_props (e.g. {"umo.world": "toy"}); loaders ignore it."""
    if image_size < 112 or image_size % 16:
        raise ValueError(f"recognizer image_size must be >= 112 and a multiple of 16, got {image_size}")
    return _export(
        model,
        torch.zeros(1, 3, image_size, image_size),
        path,
        output_names=["embedding"],
        dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
        metadata=metadata,
    )


def _export(model: nn.Module, dummy: torch.Tensor, path: str | Path, *, output_names: list[str],
            dynamic_axes: dict[str, dict[int, str]], metadata: dict[str, str] | None = None) -> Path:
    """torch.onnx.export in eval mode to `path.tmp`, then rename: a reader never sees a half-written file.

    metadata: key/value strings stored in the ONNX model's metadata_props (sorted, so bytes are stable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model, (dummy,), str(tmp), input_names=["input"], output_names=output_names,
                dynamic_axes=dynamic_axes, **_EXPORT_KW,
            )
        if metadata:
            proto = onnx.load(str(tmp))
            onnx.helper.set_model_props(proto, dict(sorted(metadata.items())))
            onnx.save(proto, str(tmp))
        tmp.replace(path)
    finally:
        model.train(was_training)
        tmp.unlink(missing_ok=True)
    return path


# insightface's SCRFD input: RGB, NCHW, (pixel - SCRFD_INPUT_MEAN) / SCRFD_INPUT_STD (its SCRFD class's constants).
SCRFD_INPUT_MEAN = 127.5
SCRFD_INPUT_STD = 128.0
# insightface's SCRFD layout with keypoints: strides 8, 16, 32 with 2 anchors per cell (9 outputs).
SCRFD_STRIDES = (8, 16, 32)
SCRFD_ANCHORS = 2
_SCRFD_LAST_DIMS = {"score": 1, "bbox": 4, "kps": 10}


def _check_detector_outputs(outs: object, height: int, width: int) -> None:
    """Raise ValueError unless `outs` are SCRFD's 9 batched outputs for one (height, width) image."""
    if not isinstance(outs, (tuple, list)) or len(outs) != 3 * len(SCRFD_STRIDES):
        n = len(outs) if isinstance(outs, (tuple, list)) else type(outs).__name__
        raise ValueError(f"detector must return {3 * len(SCRFD_STRIDES)} tensors (SCRFD: scores, bbox, kps "
                         f"for strides {SCRFD_STRIDES}), got {n}")
    for i, out in enumerate(outs):
        kind = list(_SCRFD_LAST_DIMS)[i // len(SCRFD_STRIDES)]
        stride = SCRFD_STRIDES[i % len(SCRFD_STRIDES)]
        expected = (1, (height // stride) * (width // stride) * SCRFD_ANCHORS, _SCRFD_LAST_DIMS[kind])
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"detector output {i} ({kind}, stride {stride}) must have shape "
                             f"(B, H/s*W/s*2, {_SCRFD_LAST_DIMS[kind]}) = {expected} for a {height}x{width} "
                             f"input, got {got}")


def export_detector_onnx(model: nn.Module, path: str | Path, *, example_size: tuple[int, int] = (256, 256),
                         metadata: dict[str, str] | None = None) -> Path:
    """Export a face detector as an insightface-routable SCRFD ONNX (9 outputs, batched) and return its path.

    model: (B, 3, H, W) float32, RGB normalized as (pixel - 127.5) / 128, H and W multiples of 32 ->
    9 tensors in SCRFD order: scores for strides 8, 16, 32 (B, H/s * W/s * 2, 1) in [0, 1], then bbox
    (B, ..., 4), then kps (B, ..., 10); distances in stride units from anchor centers (x = col*s, y = row*s),
    2 anchors per cell. Outputs are named score_8 ... kps_32; batch, height and width are dynamic axes.
    example_size: (height, width) traced with; multiples of 32. The module's outputs are checked on it first.
    metadata: as in export_recognizer_onnx.
    """
    height, width = (int(v) for v in example_size)
    if height <= 0 or width <= 0 or height % 32 or width % 32:
        raise ValueError(f"detector example_size must be positive multiples of 32, got {example_size}")
    dummy = torch.zeros(1, 3, height, width)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        outs = model(dummy)
    model.train(was_training)
    _check_detector_outputs(outs, height, width)
    output_names = [f"{kind}_{s}" for kind in _SCRFD_LAST_DIMS for s in SCRFD_STRIDES]
    dynamic_axes = {"input": {0: "batch", 2: "height", 3: "width"}}
    dynamic_axes |= {name: {0: "batch", 1: f"anchors_{name.rsplit('_', 1)[1]}"} for name in output_names}
    return _export(model, dummy, path, output_names=output_names, dynamic_axes=dynamic_axes, metadata=metadata)
