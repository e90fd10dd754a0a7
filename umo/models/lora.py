"""LoRA on the generator's transformer through peft, saved in the diffusers LoRA format.

`add_lora` attaches a peft adapter to the named Linear layers (the standard init: A random, B zero, so the
model starts exactly at the base weights). `save_lora` writes `pytorch_lora_weights.safetensors` with
the pipeline class's own `save_lora_weights` (keys `transformer.<module>.lora_A.weight`, plus the adapter
config as metadata), so any diffusers pipeline of the family reads it with `load_lora_weights`.
Only LoRA tensors are ever written; the base model is never saved.

Portable scale. peft adds (alpha / rank) * B A to a layer; diffusers reads alpha from the file's metadata
header, ComfyUI and kohya-style loaders from a per-module `<module>.alpha` tensor, taking alpha = rank
(scale 1) when there is none, and never read the header. A `.alpha` tensor cannot serve both: diffusers'
FLUX.2 loader (`Flux2LoraLoaderMixin`) refuses a file with any key that does not name a LoRA factor
("Invalid adapter checkpoint"). So the file carries each module's scale inside its B (`fold_scales`) and
says alpha = rank in its metadata: every loader then adds exactly B A, with no alpha to agree on.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from umo.io import canonical_safetensors
from umo.package import LORA_FILE, lora_file

log = logging.getLogger(__name__)

ADAPTER = "default"


def lora_targets(model: nn.Module, patterns: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """Full names of the nn.Linear modules whose name ends with one of `patterns` at a dot boundary, less the
    full names in `exclude` (a generator's `dead_modules`: their outputs never reach the velocity).

    >>> m = nn.Module(); m.attn = nn.Module(); m.attn.to_q = nn.Linear(2, 2); m.attn.to_out = nn.ModuleList([nn.Linear(2, 2)])
    >>> lora_targets(m, ["to_q", "to_out.0", "to_out"])
    ['attn.to_q', 'attn.to_out.0']
    """
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(name == p or name.endswith("." + p) for p in patterns) \
                and name not in exclude:
            found.append(name)
    if not found:
        raise ValueError(f"LoRA target_modules {list(patterns)} match no Linear layer of {type(model).__name__}")
    return found


def add_lora(model: nn.Module, *, rank: int, alpha: float, target_modules: Sequence[str], dropout: float = 0.0,
             seed: int | None = None, exclude: Sequence[str] = ()) -> list[str]:
    """Attach a LoRA adapter (peft) to `model`'s matching Linear layers, less `exclude` (full names); returns the
    adapted module names.

    Only the LoRA parameters require grad afterwards. `seed` fixes the random init of the A matrices.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    targets = lora_targets(model, target_modules, exclude)
    # lazy: peft and diffusers take seconds to import; `umo register`, `gate` and `deploy` only name LoRA files
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        init_lora_weights=True)
    model.requires_grad_(False)
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.add_adapter(config, adapter_name=ADAPTER)
    else:
        model.add_adapter(config, adapter_name=ADAPTER)
    n = sum(p.numel() for p in lora_parameters(model))
    log.info("LoRA rank %d alpha %g on %d layers: %.2fM trainable parameters", rank, alpha, len(targets), n / 1e6)
    return targets


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block, `model` computes as its frozen base (every LoRA off); on again afterwards, also when the
    block raises. The anchor term's base velocity (umo.train.rerefl) uses it."""
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA parameters (in a stable order)."""
    return [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]


def lora_state_dict(model: nn.Module, *, adapter_name: str = ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's tensors in peft naming (`<module>.lora_A.weight`), detached copies on the CPU."""
    # lazy: peft and diffusers take seconds to import; `umo register`, `gate` and `deploy` only name LoRA files
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu").clone().contiguous() for k, v in
            get_peft_model_state_dict(model, adapter_name=adapter_name).items()}


def lora_scales(model: nn.Module, *, adapter_name: str = ADAPTER) -> dict[str, float]:
    """{adapted module name: the scale peft multiplies its B A by}: alpha / rank (alpha / sqrt(rank) with rsLoRA)."""
    # lazy: peft and diffusers take seconds to import; `umo register`, `gate` and `deploy` only name LoRA files
    from peft.tuners.lora import LoraLayer

    return {name: float(m.scaling[adapter_name]) for name, m in model.named_modules()
            if isinstance(m, LoraLayer) and adapter_name in m.scaling}


def fold_scales(state: dict[str, torch.Tensor], scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """Each module's lora_B multiplied by its scale (computed in float64, stored in B's dtype), so that B A alone is
    the layer's weight change; `state` in peft naming (`<module>.lora_B.weight`). Exact when a scale is a power
    of two (alpha = rank, 2 rank, ...); otherwise within one rounding of B's dtype.

    >>> state = {"m.lora_A.weight": torch.ones(1, 2), "m.lora_B.weight": torch.ones(2, 1)}
    >>> fold_scales(state, {"m": 2.0})["m.lora_B.weight"].flatten()
    tensor([2., 2.])
    """
    out = dict(state)
    for module, scale in scales.items():
        key = f"{module}.lora_B.weight"
        if key not in out:
            raise KeyError(f"no {key} among the LoRA tensors to fold a scale into")
        if scale != 1.0:
            b = out[key]
            out[key] = (b.double() * scale).to(b.dtype).contiguous()
    return out


def adapter_description(model: nn.Module, *, adapter_name: str = ADAPTER) -> dict:
    """What a LoRA file says beside its tensors, as plain data (JSON): {"config": the adapter's peft config
    (targets sorted), "scales": {module: alpha / rank}}. A sharded checkpoint keeps it, so that its tensors become
    a LoRA file without the model (`write_lora_file`)."""
    config = model.peft_config[adapter_name].to_dict()
    config["target_modules"] = sorted(config["target_modules"])
    return {"config": json.loads(json.dumps(config, default=str)),
            "scales": lora_scales(model, adapter_name=adapter_name)}


def save_lora(model: nn.Module, out_dir: str | Path, *, pipeline_cls=None, fold: bool = True,
              state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter to out_dir/pytorch_lora_weights.safetensors in the diffusers LoRA format
    (`write_lora_file`). state: the adapter's tensors in peft naming when `model` holds only its shards (a
    sharded run gathers them first, umo.train.sharded); default `lora_state_dict(model)`."""
    return write_lora_file(lora_state_dict(model) if state is None else state, adapter_description(model), out_dir,
                           pipeline_cls=pipeline_cls, fold=fold)


def write_lora_file(state: dict[str, torch.Tensor], description: dict, out_dir: str | Path, *, pipeline_cls=None,
                    fold: bool = True) -> Path:
    """Write LoRA tensors (peft naming, `<module>.lora_A.weight`) and their `adapter_description` to
    out_dir/pytorch_lora_weights.safetensors in the diffusers LoRA format.

    fold: write each module's scale into its B and alpha = rank into the metadata (the module docstring: the
    file means the same to diffusers, ComfyUI and kohya-style loaders). `load_lora` takes either form back.
    Written into a temporary folder and moved into place, so readers never see a partial file; the same
    adapter always gives the same bytes (registration keys on the sha256).
    pipeline_cls: the diffusers pipeline class whose `save_lora_weights` to use (default Flux2KleinPipeline).
    """
    # lazy: peft and diffusers take seconds to import; `umo register`, `gate` and `deploy` only name LoRA files
    from diffusers import Flux2KleinPipeline

    pipeline_cls = pipeline_cls or Flux2KleinPipeline
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    metadata, scales = dict(description["config"]), description["scales"]
    if fold and any(s != 1.0 for s in scales.values()):  # alpha = rank: nothing to fold, the file as it always was
        state = fold_scales(state, scales)
        metadata |= {"lora_alpha": float(metadata["r"]), "use_rslora": False,
                     "alpha_pattern": dict(metadata.get("rank_pattern") or {})}
    pipeline_cls.save_lora_weights(tmp, transformer_lora_layers=state, weight_name=LORA_FILE,
                                   safe_serialization=True, transformer_lora_adapter_metadata=metadata)
    canonical_safetensors(tmp / LORA_FILE)  # the same weights, the same bytes (registration keys on the sha256)
    out_dir.mkdir(parents=True, exist_ok=True)
    (tmp / LORA_FILE).replace(out_dir / LORA_FILE)
    shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / LORA_FILE


def _adapter_metadata(path: Path) -> dict | None:
    """The adapter config `save_lora` writes into the header (keys without the `transformer.` prefix), or None."""
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    return None if raw is None else {k.removeprefix("transformer."): v for k, v in json.loads(raw).items()}


def _file_scale(path: Path, meta: dict | None) -> float:
    """The scale a LoRA file means for every module: its metadata's alpha / rank; 1 without metadata (the
    loaders' convention: no alpha means alpha = rank)."""
    if meta is None:
        return 1.0
    if meta.get("rank_pattern") or meta.get("alpha_pattern"):
        raise ValueError(f"{path}: per-module rank or alpha patterns in the adapter metadata; umo writes one "
                         "rank and alpha for all modules")
    rank, alpha = int(meta["r"]), float(meta["lora_alpha"])
    return alpha / math.sqrt(rank) if meta.get("use_rslora") else alpha / rank


def load_lora(model: nn.Module, path: str | Path, *, adapter_name: str = ADAPTER) -> None:
    """Load a LoRA file written by `save_lora` (or the folder holding one) into `model`'s adapter (same targets
    and rank).

    The file's scale (its metadata's alpha / rank; folded files: 1) is converted to the adapter's: B is divided
    by the scale `save_lora` folded in. Exact when the file is not folded or alpha / rank is a power of two
    (alpha = rank, the default, included); otherwise within one float rounding of B.
    Raises ValueError naming the file when its tensors do not fit the adapter (missing or unexpected keys).
    """
    # lazy: peft and diffusers take seconds to import; `umo register`, `gate` and `deploy` only name LoRA files
    from peft.utils import set_peft_model_state_dict

    path = lora_file(path)
    prefix = "transformer."
    state = {k[len(prefix):]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    expected = set(lora_state_dict(model, adapter_name=adapter_name))
    if set(state) != expected:
        extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
        raise ValueError(f"{path}: LoRA tensors do not fit the model's adapter: {len(missing)} missing "
                         f"(first {missing[:2]}), {len(extra)} unexpected (first {extra[:2]})")
    file_scale = _file_scale(path, _adapter_metadata(path))
    state = fold_scales(state, {m: file_scale / s for m, s in lora_scales(model, adapter_name=adapter_name).items()})
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{path}: unexpected LoRA keys {result.unexpected_keys[:3]}")


def attach_lora_file(model: nn.Module, path: str | Path, adapter_name: str) -> None:
    """Add the adapter a LoRA file describes (rank, alpha, targets from the metadata `save_lora` writes) to
    `model` under `adapter_name`, and load its weights exactly: folded files (alpha = rank) and earlier ones
    (the trained alpha in the metadata only) alike. Several such adapters may sit side by side; choose one with
    `model.set_adapter(name)`, none with `model.disable_adapters()`."""
    # lazy: peft and diffusers take seconds to import; `umo register`, `gate` and `deploy` only name LoRA files
    from peft import LoraConfig

    path = lora_file(path)
    meta = _adapter_metadata(path)
    if meta is None:
        raise ValueError(f"{path}: no LoRA adapter metadata (rank, alpha, targets); write LoRAs with `umo train`")
    config = LoraConfig(r=int(meta["r"]), lora_alpha=float(meta["lora_alpha"]),
                        target_modules=list(meta["target_modules"]), lora_dropout=0.0)
    with warnings.catch_warnings():  # peft warns that a second adapter is a second adapter
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        model.add_adapter(config, adapter_name=adapter_name)
    model.requires_grad_(False)
    load_lora(model, path, adapter_name=adapter_name)
