"""Checkpoints of a LoRA trained on an FSDP2-sharded transformer, and their conversion to a LoRA file.

Under FSDP2 (`fully_shard`, through accelerate's FSDP plugin with `fsdp_version: 2`) every parameter is a
DTensor of which each process holds a shard. accelerate's `save_state` would write the whole model, frozen base
included, before any hook could keep it to the LoRA, so a sharded run writes its checkpoints here instead:

    checkpoint-<step>/
        state/            torch.distributed.checkpoint (DCP): every process writes its shards of the LoRA
                          ("model", peft naming with the adapter name), of AdamW's state ("optimizer") and of
                          the EMA ("ema", when on); only the trainable parameters, never the frozen base
        sharded.json      what is not a tensor: the adapter's description (rank, alpha, targets, scales), the
                          pipeline class, AdamW's param_groups, the LR schedule's state, the world size
        rng-<rank>.safetensors   each process's RNG states (torch CPU and CUDA; Python's and numpy's in its
                          metadata)
        train_state.json, history.json   as for one process or DDP (umo.train.loop.save_checkpoint)

Only tensors go into DCP: its loader reads anything else with pickle, which no umo file needs. The caller
(`umo.train.loop.save_checkpoint`) writes into a temporary folder and renames it, then moves `latest`.

A DCP checkpoint loads on any number of processes (DCP reshards on load). `convert_checkpoint` turns one into the
diffusers LoRA file that registration and deployment use, in one process, without the model.
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from umo.io import atomic_write_json, save_safetensors
from umo.models.lora import ADAPTER, adapter_description, write_lora_file

STATE_DIR = "state"
INFO_FILE = "sharded.json"
FORMAT = "umo-fsdp2-lora/1"
# The trainable parameters only (the LoRA): the frozen base is never part of a checkpoint.
LORA_ONLY = StateDictOptions(ignore_frozen_params=True)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model`'s parameters are FSDP2 DTensors (then checkpoints go through this module)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def is_sharded_checkpoint(checkpoint: Path) -> bool:
    return (checkpoint / INFO_FILE).is_file()


def peft_name(key: str, adapter: str = ADAPTER) -> str:
    """A parameter name of the adapted model (`<module>.lora_A.<adapter>.weight`) as a LoRA file names it
    (`<module>.lora_A.weight`).

    >>> peft_name("blocks.0.attn.to_q.lora_B.default.weight")
    'blocks.0.attn.to_q.lora_B.weight'
    """
    for part in ("lora_A", "lora_B"):
        key = key.replace(f".{part}.{adapter}.", f".{part}.")
    return key


def _tensors_only(tree: Any, where: str = "state") -> None:
    if isinstance(tree, dict):
        for k, v in tree.items():
            _tensors_only(v, f"{where}.{k}")
    elif not isinstance(tree, torch.Tensor):
        raise TypeError(f"{where}: {type(tree).__name__} is not a tensor; a sharded checkpoint holds tensors only")


def save_sharded(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *,
                 ema: dict[str, torch.Tensor] | None, pipeline: str, rank: int, world: int) -> None:
    """Write this process's part of a sharded checkpoint into the folder `out` (every process calls it, with the
    same `out`; a collective)."""
    optim = get_optimizer_state_dict(model, optimizer, options=LORA_ONLY)
    state = {"model": get_model_state_dict(model, options=LORA_ONLY), "optimizer": optim["state"]}
    if ema is not None:
        state["ema"] = dict(ema)
    _tensors_only(state)
    dcp.save(state, checkpoint_id=str(out / STATE_DIR))
    _save_rng(out / f"rng-{rank}.safetensors")
    if rank == 0:
        sched = scheduler.state_dict() if scheduler is not None else None
        atomic_write_json(out / INFO_FILE, {
            "format": FORMAT, "world_size": world, "pipeline": pipeline,
            "adapter": adapter_description(_inner(model)), "param_groups": optim["param_groups"],
            "scheduler": sched})


def load_sharded(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *,
                 ema: dict[str, torch.Tensor] | None, rank: int) -> None:
    """Restore what `save_sharded` wrote into this process's shards (every process calls it; the checkpoint may
    come from another number of processes, DCP reshards). The RNG states are this rank's when the checkpoint
    has them (the same number of processes), else left as they are."""
    info = read_info(checkpoint)
    optim = get_optimizer_state_dict(model, optimizer, options=LORA_ONLY)  # initialises AdamW's state to fill
    state = {"model": get_model_state_dict(model, options=LORA_ONLY), "optimizer": optim["state"]}
    if ema is not None:
        state["ema"] = ema
    dcp.load(state, checkpoint_id=str(checkpoint / STATE_DIR))
    # strict=False: the frozen base is missing by design; a missing LoRA tensor or a stray one is an error
    result = set_model_state_dict(model, state["model"],
                                  options=StateDictOptions(ignore_frozen_params=True, strict=False))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(result.missing_keys) & trainable)
    if missing or result.unexpected_keys:
        raise ValueError(f"{checkpoint}: its LoRA does not fit the model's adapter: {len(missing)} missing "
                         f"(first {missing[:2]}), {len(result.unexpected_keys)} unexpected "
                         f"(first {list(result.unexpected_keys)[:2]})")
    groups = info["param_groups"]
    for group in groups:  # JSON has lists; AdamW keeps its betas as a tuple
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    set_optimizer_state_dict(model, optimizer, {"state": state["optimizer"], "param_groups": groups},
                             options=LORA_ONLY)
    if scheduler is not None and info.get("scheduler") is not None:
        scheduler.load_state_dict(info["scheduler"])
    rng = checkpoint / f"rng-{rank}.safetensors"
    if rng.is_file():
        _load_rng(rng)


def read_info(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / INFO_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable sharded checkpoint description ({err})") from err
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{path}: format {info.get('format') if isinstance(info, dict) else None!r}, expected "
                         f"{FORMAT!r}")
    missing = [k for k in ("world_size", "pipeline", "adapter", "param_groups", "scheduler") if k not in info]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}")
    return info


def gathered_lora(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole LoRA in peft naming (`<module>.lora_A.weight`), on the CPU, on the main process ({} on the
    others): a collective that every process calls."""
    full = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True, full_state_dict=True,
                                                                 cpu_offload=True))
    return {peft_name(k): v.contiguous() for k, v in full.items()}


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


# ------------------------------------------------------------------------------------------------ RNG


def _save_rng(path: Path) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(mt), gauss], "numpy": [kind, keys.tolist(), int(pos), int(has_gauss),
                                                             float(cached)]}
    save_safetensors(tensors, path, metadata=meta)  # the metadata as one JSON entry, "umo"


def _load_rng(path: Path) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        torch.set_rng_state(f.get_tensor("torch"))
        cuda = sorted((k for k in f.keys() if k.startswith("cuda")), key=lambda k: int(k[4:]))
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([f.get_tensor(k) for k in cuda])
    states = json.loads(meta["umo"])
    version, mt, gauss = states["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ------------------------------------------------------------------------------------------------ conversion


def read_sharded_lora(checkpoint: Path, *, key: str = "model") -> dict[str, torch.Tensor]:
    """The whole LoRA (or the EMA: key="ema") of a sharded checkpoint, in peft naming, read in this one process
    (no process group, no model): the tensors' shapes and dtypes come from DCP's metadata."""
    # lazy: only conversion reads a checkpoint without a process group
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = checkpoint / STATE_DIR
    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except (OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{folder}: not a readable DCP checkpoint ({err})") from err
    prefix = f"{key}."
    state = {}
    for name, meta in metadata.state_dict_metadata.items():
        if name.startswith(prefix):
            if not isinstance(meta, TensorStorageMetadata):
                raise ValueError(f"{folder}: {name} is not a tensor")
            state[name[len(prefix):]] = torch.empty(meta.size, dtype=meta.properties.dtype)
    if not state:
        raise ValueError(f"{folder}: holds no {key!r} tensors")
    with warnings.catch_warnings():  # DCP warns that it reads in one process: what this is for
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({key: state}, checkpoint_id=str(folder), no_dist=True)
    return {peft_name(k): v for k, v in state.items()}


def convert_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, ema: bool = False) -> Path:
    """A sharded checkpoint's LoRA (its EMA with ema=True) as out_dir/pytorch_lora_weights.safetensors, the diffusers
    LoRA file that `umo train` exports and registration and deployment read (folded, byte for byte the file the
    run would export at that step). Returns the file."""
    # lazy: diffusers takes seconds to import; the pipeline class names the file's writer
    import diffusers

    checkpoint = Path(checkpoint)
    info = read_info(checkpoint)
    pipeline_cls = getattr(diffusers, info["pipeline"], None)
    if pipeline_cls is None:
        raise ValueError(f"{checkpoint / INFO_FILE}: unknown pipeline class {info['pipeline']!r}")
    state = read_sharded_lora(checkpoint, key="ema" if ema else "model")
    return write_lora_file(state, info["adapter"], out_dir, pipeline_cls=pipeline_cls)
