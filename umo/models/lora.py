"""LoRA on the generator's transformer through peft, saved in the diffusers LoRA format.

`add_lora` attaches a peft adapter to the named Linear layers (the standard init: A random, B zero, so the
model starts exactly at the base weights). `save_lora` writes `pytorch_lora_weights.safetensors` with
the pipeline class's own `save_lora_weights` (keys `transformer.<module>.lora_A.weight`, plus the adapter
config as metadata), so any diffusers pipeline of the family reads it with `load_lora_weights`.
Only LoRA tensors are ever written; the base model is never saved.
"""

from __future__ import annotations

import json
import logging
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

log = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default weight name
ADAPTER = "default"


def lora_targets(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Full names of the nn.Linear modules whose name ends with one of `patterns` at a dot boundary.

    >>> m = nn.Module(); m.attn = nn.Module(); m.attn.to_q = nn.Linear(2, 2); m.attn.to_out = nn.ModuleList([nn.Linear(2, 2)])
    >>> lora_targets(m, ["to_q", "to_out.0", "to_out"])
    ['attn.to_q', 'attn.to_out.0']
    """
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(name == p or name.endswith("." + p) for p in patterns):
            found.append(name)
    if not found:
        raise ValueError(f"LoRA target_modules {list(patterns)} match no Linear layer of {type(model).__name__}")
    return found


def add_lora(model: nn.Module, *, rank: int, alpha: float, target_modules: Sequence[str], dropout: float = 0.0,
             seed: int | None = None) -> list[str]:
    """Attach a LoRA adapter (peft) to `model`'s matching Linear layers; returns the adapted module names.

    Only the LoRA parameters require grad afterwards. `seed` fixes the random init of the A matrices.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    targets = lora_targets(model, target_modules)
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


def save_lora(model: nn.Module, out_dir: str | Path, *, pipeline_cls=None) -> Path:
    """Write the adapter to out_dir/pytorch_lora_weights.safetensors in the diffusers LoRA format.

    Written into a temporary folder and moved into place, so readers never see a partial file.
    pipeline_cls: the diffusers pipeline class whose `save_lora_weights` to use (default Flux2KleinPipeline).
    """
    # lazy: peft and diffusers take seconds to import; `umo register`, `gate` and `deploy` only name LoRA files
    from diffusers import Flux2KleinPipeline

    pipeline_cls = pipeline_cls or Flux2KleinPipeline
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = model.peft_config[ADAPTER]
    metadata = config.to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    pipeline_cls.save_lora_weights(tmp, transformer_lora_layers=lora_state_dict(model), weight_name=LORA_FILE,
                                   safe_serialization=True, transformer_lora_adapter_metadata=metadata)
    canonical_safetensors(tmp / LORA_FILE)  # the same weights, the same bytes (registration keys on the sha256)
    out_dir.mkdir(parents=True, exist_ok=True)
    (tmp / LORA_FILE).replace(out_dir / LORA_FILE)
    shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / LORA_FILE


def load_lora(model: nn.Module, path: str | Path, *, adapter_name: str = ADAPTER) -> None:
    """Load a LoRA file written by `save_lora` into `model`'s adapter (same targets and rank), exactly.

    Raises ValueError naming the file when its tensors do not fit the adapter (missing or unexpected keys).
    """
    # lazy: peft and diffusers take seconds to import; `umo register`, `gate` and `deploy` only name LoRA files
    from peft.utils import set_peft_model_state_dict

    path = Path(path)
    prefix = "transformer."
    state = {k[len(prefix):]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    expected = set(lora_state_dict(model, adapter_name=adapter_name))
    if set(state) != expected:
        extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
        raise ValueError(f"{path}: LoRA tensors do not fit the model's adapter: {len(missing)} missing "
                         f"(first {missing[:2]}), {len(extra)} unexpected (first {extra[:2]})")
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{path}: unexpected LoRA keys {result.unexpected_keys[:3]}")


def lora_file(path: str | Path) -> Path:
    """A LoRA file, or a folder holding one (a training run's `lora/`, a checkpoint): the file's path."""
    path = Path(path)
    if path.is_dir():
        path = path / LORA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no LoRA file (expected {LORA_FILE} written by `umo train`)")
    return path


def attach_lora_file(model: nn.Module, path: str | Path, adapter_name: str) -> None:
    """Add the adapter a LoRA file describes (rank, alpha, targets from the metadata `save_lora` writes) to
    `model` under `adapter_name`, and load its weights exactly. Several such adapters may sit side by side;
    choose one with `model.set_adapter(name)`, none with `model.disable_adapters()`."""
    # lazy: peft and diffusers take seconds to import; `umo register`, `gate` and `deploy` only name LoRA files
    from peft import LoraConfig

    path = lora_file(path)
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    if raw is None:
        raise ValueError(f"{path}: no LoRA adapter metadata (rank, alpha, targets); write LoRAs with `umo train`")
    meta = {k.removeprefix("transformer."): v for k, v in json.loads(raw).items()}
    config = LoraConfig(r=int(meta["r"]), lora_alpha=float(meta["lora_alpha"]),
                        target_modules=list(meta["target_modules"]), lora_dropout=0.0)
    with warnings.catch_warnings():  # peft warns that a second adapter is a second adapter
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        model.add_adapter(config, adapter_name=adapter_name)
    model.requires_grad_(False)
    load_lora(model, path, adapter_name=adapter_name)
