"""The ReReFL training recipe on accelerate, as named steps that `train` runs in this order:

    setup           `setup_accelerator`, `setup_data`, `setup_reward`, `setup_model` (the generator, its LoRA,
                    AdamW, the LR schedule) and the EMA, gathered in a `Run`;
    resume          `resume_run`: a checkpoint's LoRA, optimizer, schedule, RNG states, EMA, data position and
                    history (its docstring holds the resume rules);
    tracking        `start_tracking`: the MLflow run (new, or the checkpoint's) and its params (main process);
    the step loop   `train_loop`: `optimizer_step` until max_steps; `log_step`, sample images and
                    `save_checkpoint` on their cadences;
    export          `export`: the final LoRA, history.json and train_metrics.json.

One process per device (`accelerate launch` or `torchrun`; a plain `python` call is one process). Each process
trains the same LoRA and takes its own shard of every epoch's batches (`umo.train.data`). Under DDP each holds
the whole generator and gradients are averaged at the last micro-batch of a step. Under FSDP2 (accelerate's FSDP
plugin, `fsdp_version: 2`) the transformer's weights, the LoRA and AdamW's state are sharded across the
processes; each call of the transformer gathers a block's shards, so every process draws the gradient step t
alike, and checkpoints are DCP shards of the LoRA and the optimizer (`umo.train.sharded`).

One optimizer step = `gradient_accumulation_steps` micro-batches of `batch_size` samples per process, each a
`rerefl_step`; then clipping, AdamW, the LR schedule and the optional EMA of the LoRA.

Non-finite values: every process checks its loss, and the processes agree (an all-reduce) before anyone runs
backward. A non-finite loss or gradient norm on ANY process skips the optimizer step everywhere (counted in
`skipped_nonfinite`); `max_nonfinite_steps` of them in a row raise `NonFiniteLossError`.

Outputs: `out/checkpoints/` (`save_checkpoint`), `out/lora/` (the final LoRA), `out/train_metrics.json` (a
summary) and `out/history.json` (every logged step's metrics, those before a resume point kept).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

import umo
from umo.config import (
    FacesConfig,
    GeneratorConfig,
    LoraConfig,
    RewardConfig,
    TrackingConfig,
    TrainConfig,
    to_dict,
)
from umo.data.manifest import Manifest, load_embeddings, read_manifest
from umo.eval.score import Judge
from umo.images import signed_to_rgb
from umo.io import atomic_write_bytes, atomic_write_json, dataset_record, save_safetensors, sha256_file
from umo.models import load_generator
from umo.models.base import Generator
from umo.models.lora import LORA_FILE, add_lora, load_lora, lora_parameters, save_lora
from umo.progress import progress as umo_progress
from umo.reward import MatchingReward
from umo.tracking import Tracker, flatten, source_tags, tracking_uri
from umo.train.data import TrainData, epoch_batches, manifest_fingerprint, shard
from umo.train.guard import JudgeCheck, matching_pictures
from umo.train import sharded
from umo.train.rerefl import METRICS, SUMMARY_METRICS, Batch, StepOutput, draw_grad_step, rerefl_step

if TYPE_CHECKING:  # type hints only: accelerate is imported lazily, by setup_accelerator
    from accelerate import Accelerator

log = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
HISTORY_FILE = "history.json"  # every logged step's metrics (the curves of MLflow, as a file)
EMA_FILE = "ema.safetensors"
LATEST = "latest"
AUTO = "auto"
# Settings a resumed run may change; any other difference from the checkpoint is an error.
RESUMABLE_CHANGES = {"train.max_steps", "train.checkpoint_every", "train.checkpoints_total_limit",
                     "train.log_every", "train.sample_every", "train.max_nonfinite_steps", "train.judge_every"}
# LR schedules that do not depend on max_steps: with these, a run resumed with more steps equals a fresh one.
FLAT_SCHEDULES = {"constant", "constant_with_warmup"}
# umo's sources a LoRA depends on (the DVC stage's code deps), relative to the package.
CODE = ("train", "models", "reward.py")
# Files up to SMALL_FILE bytes are hashed whole; larger ones (weights) by size, safetensors header and SAMPLES
# evenly spaced chunks of SAMPLE_BYTES: a multi-GB generator costs a few MB of reads.
SMALL_FILE = 4 << 20
SAMPLES, SAMPLE_BYTES = 16, 64 << 10


class NonFiniteLossError(RuntimeError):
    """The loss or gradient was non-finite for `max_nonfinite_steps` optimizer steps in a row."""


class ResumeError(ValueError):
    """No usable checkpoint, or a checkpoint made with settings that may not change."""


@dataclass
class TrainState:
    """What train_state.json holds (see `resume_run`)."""

    step: int = 0
    epoch: int = 0
    consumed: int = 0  # global batches of `epoch` consumed, all processes together
    skipped_nonfinite: int = 0
    consecutive_nonfinite: int = 0
    world_size: int = 1
    mlflow_run_id: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] | None = None
    """`input_fingerprint` of the inputs every step so far trained on; None when unknown (a checkpoint of an
    older umo) or mixed (a `resume="latest"` over changed inputs)."""


@dataclass
class TrainResult:
    step: int
    lora: Path  # the final LoRA file (the EMA's weights when the EMA is on)
    summary: dict[str, Any]
    run_id: str | None
    transformer: torch.nn.Module = field(repr=False, default=None)
    """This process's trained transformer (unwrapped; live LoRA weights, not the EMA)."""


class LoraEMA:
    """Exponential moving average of the LoRA parameters (fp32 shadows, identical on every process)."""

    def __init__(self, named: dict[str, torch.nn.Parameter], decay: float) -> None:
        self.decay = decay
        self.params = named
        self.shadow = {n: p.detach().float().clone() for n, p in named.items()}

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the live parameters and the averages (call twice to undo)."""
        for n, p in self.params.items():
            live = p.detach().clone()
            p.copy_(self.shadow[n].to(p.dtype))
            self.shadow[n] = live.float()


@dataclass(frozen=True)
class Sections:
    """The settings a training run reads, and nothing else (what `train` takes, section by section)."""

    train: TrainConfig
    generator: GeneratorConfig
    lora: LoraConfig
    reward: RewardConfig
    faces: FacesConfig  # the reward's detector and embedder
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, **{k: to_dict(getattr(self, k)) for k in ("generator", "lora", "reward", "train",
                                                                              "faces")}}


@dataclass
class Run:
    """One training run, passed explicitly from step to step: what `setup` built, and what the steps advance
    (`state`, `history`, the data-order cache)."""

    config: Sections
    out: Path
    accelerator: Accelerator
    data: TrainData
    reward: MatchingReward  # or anything with its `compute` and `to` (tests inject one); on the device
    gen: Generator  # its denoiser is `model`
    model: torch.nn.Module  # the transformer as accelerate prepared it (DDP-wrapped on several processes)
    params: dict[str, torch.nn.Parameter]  # the trainable (LoRA) parameters by name, fp32
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a torch LR scheduler, wrapped by accelerate
    ema: LoraEMA | None
    state: TrainState
    history: list[dict[str, float]] = field(default_factory=list)  # every logged step's metrics
    tracker: Tracker | None = None  # main process, when tracking
    logged: int = 0  # the last step MLflow already has (see `resume_run`)
    order: tuple[int, list[list[int]]] | None = None  # (epoch, this process's batches of it)
    judge_check: JudgeCheck | None = None  # made at the first check (main process): the gate's judge, its cache

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def sharded(self) -> bool:
        """FSDP2: the transformer's parameters are sharded across the processes (umo.train.sharded)."""
        return self.accelerator.is_fsdp2


def draw_seed(seed: int, step: int, micro: int, rank: int | None) -> int:
    """The seed of one micro-batch's random draws: independent of everything that happened before it. rank None:
    the seed of a draw that every process makes alike."""
    entropy = [seed, step, micro] if rank is None else [seed, step, micro, rank]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


TRACKED = ("seed", "generator", "lora", "reward", "train")  # the sections training reads (and faces' models)


def resume_settings(config: Sections) -> dict[str, Any]:
    """The settings a checkpoint is tied to (flattened)."""
    d = config.to_dict()
    return flatten({k: d[k] for k in TRACKED})


def find_checkpoint(out: Path, resume: str) -> Path | None:
    """`resume` = "latest" (the pointer in out/checkpoints; None when there is none) or a checkpoint folder."""
    if resume == LATEST:
        pointer = out / "checkpoints" / LATEST
        if not pointer.is_file():
            return None
        path = out / "checkpoints" / pointer.read_text().strip()
    else:
        path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ResumeError(f"{path}: not a complete checkpoint (no {STATE_FILE})")
    return path


def sample_grid(batch: Batch, images: torch.Tensor) -> np.ndarray:
    """One row per sample: its references (resized to the image height) then the decoded x0_hat; uint8."""
    rows = []
    h = images.shape[2]
    for refs, image in zip(batch.references, images):
        tiles = [torch.nn.functional.interpolate(r[None].float().cpu(), size=(h, h * r.shape[2] // r.shape[1]),
                                                 mode="area")[0] for r in refs]
        rows.append(torch.cat(tiles + [image.float().cpu()], dim=2))
    width = max(r.shape[2] for r in rows)
    rows = [torch.nn.functional.pad(r, (0, width - r.shape[2]), value=-1.0) for r in rows]
    grid = torch.cat(rows, dim=1)
    return signed_to_rgb(grid)


def train(settings: TrainConfig, *, generator: GeneratorConfig, lora: LoraConfig, reward: RewardConfig,
          faces: FacesConfig, seed: int, manifest: str | Path, out: str | Path, resume: str | None = None,
          tracking: TrackingConfig | None = None, reward_model=None) -> TrainResult:
    """Train the LoRA on `manifest`'s samples into `out`: setup, resume, tracking, the step loop, export (the
    module docstring lists the steps; `resume_run` states the resume rules).

    generator: the base (frozen); lora: the adapter; reward and faces: the reward and its detector and
    embedder; seed: data order, draws and LoRA init. resume: "auto", "latest" or a checkpoint folder (see
    `resume_run`); None starts a new run. tracking: where to log (MLflow, main process only); None: nowhere.
    reward_model: a ready `MatchingReward` (tests inject one) instead of the one `reward` and `faces` describe.
    """
    config = Sections(settings, generator, lora, reward, faces, seed)
    run = setup(config, manifest=manifest, out=Path(out), reward=reward_model)
    checkpoint = resume_run(run, resume)
    if tracking is not None and run.main:
        start_tracking(run, tracking, manifest, resumed=checkpoint is not None)
    started = time.perf_counter()
    train_loop(run)
    return export(run, started)


# ------------------------------------------------------------------------------------------------ setup


def setup(config: Sections, *, manifest: str | Path, out: Path, reward=None) -> Run:
    """Everything a run needs, in this order: the accelerator (and the global seed, which LoRA dropout draws
    from), the data, the reward (built from the config when None), the model + LoRA, AdamW and the LR schedule,
    the EMA (when train.ema_decay > 0) and a fresh `TrainState` (this run's settings, `input_fingerprint`)."""
    accelerator, precision = setup_accelerator(config)
    data = setup_data(config, manifest, accelerator.num_processes)
    if reward is None:
        reward = setup_reward(config, manifest, data.manifest)
    reward = reward.to(accelerator.device)
    gen, model, params, optimizer, scheduler = setup_model(config, accelerator, precision)
    ema = LoraEMA(params, config.train.ema_decay) if config.train.ema_decay else None
    state = TrainState(world_size=accelerator.num_processes, settings=resume_settings(config),
                       inputs=input_fingerprint(config, manifest, data))
    return Run(config, out, accelerator, data, reward, gen, model, params, optimizer, scheduler, ema, state)


def setup_accelerator(config: Sections) -> tuple[Accelerator, str]:
    """This process's accelerator (CPU in fp32 without a GPU), its log level and the global seed.

    Returns the accelerator and the mixed precision in effect ("no" on the CPU).
    """
    # lazy: accelerate is heavy (the distributed stack) and only the trainer needs it
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    tc = config.train
    use_cuda = torch.cuda.is_available()
    precision = tc.mixed_precision if use_cuda else "no"
    accelerator = Accelerator(cpu=not use_cuda, mixed_precision=precision, step_scheduler_with_optimizer=False,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
    shard_on_cpu(accelerator)
    kind = accelerator.distributed_type.name
    if kind in ("DEEPSPEED", "MEGATRON_LM") or (kind == "FSDP" and not accelerator.is_fsdp2):
        # Their save_state writes the whole sharded model before any hook can keep it to the LoRA; FSDP2's
        # checkpoints are umo's own (umo.train.sharded).
        raise NotImplementedError(f"{kind}{'' if kind != 'FSDP' else ' version 1'}: umo trains on one process, "
                                  "DDP or FSDP2 (fsdp_version: 2, infra/accelerate/fsdp_8gpu.yaml)")
    if not accelerator.is_main_process:
        logging.getLogger("umo").setLevel(logging.WARNING)
    set_seed(config.seed, device_specific=True)  # only LoRA dropout draws from the global RNG
    if precision != tc.mixed_precision:
        log.info("mixed_precision %s needs a GPU: training in fp32 on the CPU", tc.mixed_precision)
    return accelerator, precision


def shard_on_cpu(accelerator: Accelerator) -> None:
    """FSDP2 on the CPU (gloo), for tests and debugging: accelerate runs FSDP on accelerators only and falls back
    to plain multi-process CPU when `accelerate launch` asks for FSDP without one (ACCELERATE_USE_FSDP). The
    launch's FSDP settings (the FSDP_* variables) then shard the model as they would on GPUs."""
    # lazy: accelerate is heavy (the distributed stack) and only the trainer needs it
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and accelerator.distributed_type == DistributedType.MULTI_CPU:
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
        # both shared states: each new AcceleratorState() copies the process state's over its own
        PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
        log.info("FSDP%s on the CPU (gloo): %d processes", accelerator.state.fsdp_plugin.fsdp_version,
                 accelerator.num_processes)


def setup_data(config: Sections, manifest: str | Path, world: int) -> TrainData:
    """The manifest's samples; an error when they give no full batch per process."""
    man = read_manifest(manifest)
    data = TrainData(man, load_embeddings(man), resolution=config.generator.resolution,
                     reference_resolution=config.generator.reference_resolution)
    if data.batches_per_epoch(config.train.batch_size, world) == 0:
        raise ValueError(f"{manifest}: {len(data)} samples give no full batch of {config.train.batch_size} per "
                         f"process on {world} processes (samples of a batch share their number of references)")
    return data


def setup_reward(config: Sections, manifest: str | Path, man: Manifest) -> MatchingReward:
    """The configured reward, once the manifest's reference embeddings are known to come from its embedder."""
    recorded = man.embedder.get("sha256")
    if recorded and recorded != sha256_file(config.faces.embedder.path):
        raise ValueError(f"{manifest}: its reference embeddings were made by another embedder than "
                         f"{config.faces.embedder.path} (sha256 differs): re-run `umo prepare`")
    return MatchingReward.from_config(config.faces, config.reward)


def setup_model(config: Sections, accelerator: Accelerator, precision: str):
    """The generator with a fresh LoRA (trained in fp32 whatever the frozen weights are), AdamW and the LR
    schedule, prepared by accelerate, whose checkpoints then hold only the LoRA.

    Returns (generator, prepared transformer, trainable parameters by name, optimizer, scheduler).
    """
    # lazy: diffusers is heavy; only its LR schedules are used here
    from diffusers.optimization import get_scheduler

    tc = config.train
    weight_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = load_generator(config.generator, dtype=weight_dtype, device=accelerator.device)
    transformer = gen.transformer
    add_lora(transformer, rank=config.lora.rank, alpha=config.lora.alpha, target_modules=config.lora.target_modules,
             dropout=config.lora.dropout, seed=config.seed, exclude=gen.dead_modules)
    for p in lora_parameters(transformer):
        p.data = p.data.float()
    if tc.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    params = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(list(params.values()), lr=tc.learning_rate, weight_decay=tc.weight_decay)
    scheduler = get_scheduler(tc.lr_scheduler, optimizer, num_warmup_steps=tc.warmup_steps,
                              num_training_steps=tc.max_steps)
    model, optimizer, scheduler = accelerator.prepare(transformer, optimizer, scheduler)
    gen.denoiser = model
    if accelerator.is_fsdp2:  # fully_shard replaced every parameter by a DTensor (the optimizer holds those)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    else:  # checkpoints are accelerate's save_state, kept to the LoRA (sharded ones: umo.train.sharded)
        accelerator.register_save_state_pre_hook(partial(_save_lora_only, accelerator))
        accelerator.register_load_state_pre_hook(partial(_load_lora_only, accelerator))
    return gen, model, params, optimizer, scheduler


def _save_lora_only(accelerator: Accelerator, models: list, weights: list, output_dir: str) -> None:
    """accelerate's save_state hook: the LoRA (main process), never the base weights; unfolded (the adapter's own
    alpha and B), so that a resume is exact for any alpha / rank."""
    if accelerator.is_main_process:
        save_lora(accelerator.unwrap_model(models[0]), output_dir, fold=False)
    weights.clear()


def _load_lora_only(accelerator: Accelerator, models: list, input_dir: str) -> None:
    """accelerate's load_state hook: the LoRA of `_save_lora_only`."""
    load_lora(accelerator.unwrap_model(models[0]), Path(input_dir) / LORA_FILE)
    models.clear()


# ------------------------------------------------------------------------------------------------ inputs


def input_fingerprint(config: Sections, manifest: str | Path, data: TrainData) -> dict[str, str]:
    """What a run's LoRA depends on, one sha256 (hex) per input; `resume="auto"` resumes only when every one
    equals the checkpoint's:

    settings   `resume_settings` less RESUMABLE_CHANGES (train.max_steps stays unless the LR schedule is flat:
               cosine and linear bend at another max_steps), and the faces section's detector and embedder;
    data       the manifest (`umo.train.data.manifest_fingerprint`);
    generator  the generator folder (`path_fingerprint`: weights by size, header and sampled bytes);
    reward     the reward embedder file and the detector's model folder;
    code       umo's version and its sources under CODE (the DVC stage's code deps).

    No modification times: a `dvc checkout` or a copy changes them, not the content.
    """
    tc, faces = config.train, config.faces
    settings = {k: v for k, v in resume_settings(config).items() if k not in RESUMABLE_CHANGES}
    if tc.lr_scheduler not in FLAT_SCHEDULES:
        settings["train.max_steps"] = tc.max_steps
    settings |= flatten({"faces": {"detector": to_dict(faces.detector), "embedder": to_dict(faces.embedder),
                                   "min_face_size": faces.min_face_size}})
    detector = Path(faces.detector.root) / (faces.detector.pack or "")
    return {"settings": _sha(json.dumps(settings, sort_keys=True, default=str)),
            "data": manifest_fingerprint(data.manifest, manifest),
            "generator": path_fingerprint(config.generator.path),
            "reward": _sha(path_fingerprint(faces.embedder.path), path_fingerprint(detector)),
            "code": code_fingerprint()}


def _sha(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def file_fingerprint(path: Path) -> str:
    """sha256 of a file up to SMALL_FILE bytes; of a larger one, of its size, its safetensors header (names,
    dtypes, shapes, offsets) and SAMPLES evenly spaced chunks: a retrained model of the same shapes differs in
    the sampled bytes, and a multi-GB file costs about 1 MB of reads."""
    size = path.stat().st_size
    if size <= SMALL_FILE:
        return sha256_file(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if path.suffix == ".safetensors":
            header = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(header, size - 8)))
        for k in range(SAMPLES):
            f.seek((size - SAMPLE_BYTES) * k // (SAMPLES - 1))
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def path_fingerprint(path: str | Path) -> str:
    """`file_fingerprint` of a file, or of every file under a folder with its relative name (hidden files and
    folders, such as a download tool's .cache, left out); "absent" when there is nothing at `path`."""
    path = Path(path)
    if path.is_file():
        return file_fingerprint(path)
    if not path.is_dir():
        return "absent"
    files = sorted(f for f in path.rglob("*")
                   if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts))
    return _sha(*(f"{f.relative_to(path).as_posix()} {file_fingerprint(f)}" for f in files))


def code_fingerprint() -> str:
    """sha256 of umo's version and its Python sources under CODE (names and contents)."""
    root = Path(umo.__file__).parent
    files = sorted(f for name in CODE
                   for f in ([root / name] if name.endswith(".py") else (root / name).rglob("*.py")))
    return _sha(umo.__version__, *(f"{f.relative_to(root).as_posix()} {sha256_file(f)}" for f in files))


def changed_inputs(saved: dict[str, str] | None, now: dict[str, str]) -> list[str]:
    """The names of the inputs that differ (all of them when `saved` is None: unknown or mixed)."""
    if saved is None:
        return sorted(now)
    return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))


# ------------------------------------------------------------------------------------------------ resume


def resume_run(run: Run, resume: str | None) -> Path | None:
    """Continue from a checkpoint; returns it (None: the run starts at step 0). The resume rules:

    - Which: `resume` = "auto" (below), "latest" (out/checkpoints/latest; none there: start at step 0) or a
      checkpoint folder (`find_checkpoint`; one without train_state.json is a ResumeError). resume=None into a
      folder that has checkpoints is a ResumeError too: runs never mix.
    - "auto" (the DVC stage's; `auto_checkpoint`): the latest checkpoint when its `input_fingerprint` (the
      settings that may not change, the data, the generator, the reward's models, the code) and its number of
      processes equal this run's and its step is within max_steps; otherwise the log says why, the earlier
      run's outputs in `out` are deleted and the run starts at step 0. A checkpoint at max_steps is only
      exported again. So the result is always the LoRA a run from step 0 would train.
    - What must match: every setting of `resume_settings` (seed, generator, lora, reward, train) except those
      in RESUMABLE_CHANGES (max_steps, the checkpoint / log / sample cadences, max_nonfinite_steps); any
      other difference is a ResumeError. With a larger max_steps the LR schedule, defined over max_steps,
      bends from the resume point on (unless it is constant; "auto" starts over instead). Other inputs that
      changed (data, generator, reward models, code) are a warning with "latest" or a folder, and the run's
      fingerprint is then unknown (None): a later "auto" starts over.
    - What is restored: the LoRA, the optimizer and LR-scheduler states and every process's RNG states
      (accelerate's load_state; the base model is never saved, it comes from the generator section), the EMA's
      averages (ema.safetensors), and from train_state.json the step, the data position (epoch, global batches
      consumed), the non-finite counters and the MLflow run id (world_size and settings are this run's).
    - Data order and random draws: the batch order is a function of (seed, epoch) (`umo.train.data`) and every
      draw of a micro-batch comes from a generator seeded by `draw_seed`(seed, step, micro-batch, process); LoRA
      dropout, the only user of the global RNG, continues from the restored RNG states. So a run stopped or
      crashed after the checkpoint of step N and resumed ends with the LoRA (and EMA) of the uninterrupted run,
      bit for bit. On another number of processes it continues from the same data position, but with other
      shards it is no longer bit-exact (a warning says so).
    - history.json: the checkpoint's copy (a crashed run wrote no out/history.json; a checkpoint of an older umo
      has none, then out/history.json is read), cut to the steps up to the checkpoint; steps run again are
      appended once, so the final file lists every logged step once.
    - MLflow: the checkpoint's run is continued (`start_tracking`); steps past the checkpoint that a crashed run
      had already logged run again but are not logged again (`Run.logged`: the last step of
      "skipped_nonfinite", the one metric logged at every logged step, even a non-finite one);
      their sample images are written again under the same names.
    """
    out = run.out
    if resume == AUTO:
        checkpoint = auto_checkpoint(run)
    else:
        checkpoint = find_checkpoint(out, resume) if resume else None
        if resume and checkpoint is None:
            log.info("resume=%s: no checkpoint in %s, starting from step 0", resume, out / "checkpoints")
    if checkpoint is None:
        if (out / "checkpoints" / LATEST).exists():
            raise ResumeError(f"{out}: holds checkpoints of an earlier run; pass resume='auto' or 'latest' "
                              "(--resume auto|latest) to continue it, or choose another output folder")
        return None
    saved = read_train_state(checkpoint, run.state.settings, run.world)
    changed = None if saved.inputs is None else changed_inputs(saved.inputs, run.state.inputs)
    if changed:  # "auto" never gets here with a change
        log.warning("%s: trained on other inputs (%s) than this run's; resuming as asked, a later "
                    "resume='auto' starts over", checkpoint, ", ".join(changed))
    if run.sharded:
        if not sharded.is_sharded_checkpoint(checkpoint):
            raise ResumeError(f"{checkpoint}: not a sharded checkpoint; an FSDP run resumes only its own kind")
        sharded.load_sharded(checkpoint, run.model, run.optimizer, run.scheduler,
                             ema=None if run.ema is None else run.ema.shadow, rank=run.rank)
    else:
        if sharded.is_sharded_checkpoint(checkpoint):
            raise ResumeError(f"{checkpoint}: a sharded (FSDP2) checkpoint; resume it under FSDP, or convert its "
                              "LoRA with `umo convert-checkpoint`")
        run.accelerator.load_state(str(checkpoint))
        if run.ema is not None:
            run.ema.shadow = load_file(str(checkpoint / EMA_FILE))
    run.state = TrainState(**{**asdict(saved), "world_size": run.world, "settings": run.state.settings,
                              "inputs": run.state.inputs if changed == [] else None})
    run.history = read_history(checkpoint, out, run.state.step)
    log.info("resumed from %s at step %d (epoch %d, %d batches in)", checkpoint, run.state.step,
             run.state.epoch, run.state.consumed)
    return checkpoint


def auto_checkpoint(run: Run) -> Path | None:
    """resume="auto": the latest checkpoint when it continues this very run (same `input_fingerprint` and
    number of processes, step within max_steps); else None, once the log has said why and `clear_run` has
    deleted the earlier run's outputs (main process; every process decides alike from the same files)."""
    root, max_steps = run.out / "checkpoints", run.config.train.max_steps
    checkpoint, why = None, None
    if not (root / LATEST).is_file():
        why = f"no checkpoint in {root}"
    else:
        try:
            checkpoint = find_checkpoint(run.out, LATEST)
        except ResumeError as err:
            why = str(err)
        else:
            saved = TrainState(**json.loads((checkpoint / STATE_FILE).read_text()))
            changed = changed_inputs(saved.inputs, run.state.inputs)
            if saved.inputs is None:
                why = f"{checkpoint} records no input fingerprint (an older umo, or resumed over changes)"
            elif changed:
                why = f"{checkpoint} was trained on other inputs: {', '.join(changed)} changed"
            elif saved.world_size != run.world:
                why = f"{checkpoint} ran on {saved.world_size} processes, this run on {run.world}"
            elif saved.step > max_steps:
                why = f"{checkpoint} is past train.max_steps={max_steps}"
    if why is None:
        log.info("resume=auto: %s continues this run (same inputs): resuming", checkpoint)
        return checkpoint
    earlier = root.exists() or (run.out / "lora").exists()
    log.log(logging.WARNING if earlier else logging.INFO, "resume=auto: %s; starting from step 0%s", why,
            f" (deleting the earlier run's checkpoints and outputs in {run.out})" if earlier else "")
    run.accelerator.wait_for_everyone()  # every process has read the checkpoint before it goes
    if run.main and earlier:
        clear_run(run.out)
    run.accelerator.wait_for_everyone()
    return None


def clear_run(out: Path) -> None:
    """Delete an earlier run's outputs from `out`: checkpoints/, lora/, history.json, train_metrics.json."""
    for name in ("checkpoints", "lora"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (HISTORY_FILE, "train_metrics.json"):
        (out / name).unlink(missing_ok=True)


def read_train_state(checkpoint: Path, settings: dict[str, Any], world: int) -> TrainState:
    """The checkpoint's train_state.json, once its settings are found compatible with `settings`."""
    saved = TrainState(**json.loads((checkpoint / STATE_FILE).read_text()))
    changed = sorted(k for k in set(saved.settings) | set(settings)
                     if saved.settings.get(k) != settings.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        raise ResumeError(f"{checkpoint}: made with other settings for {changed[:5]}; these may not change "
                          "on resume (start a new output folder instead)")
    if saved.world_size != world:
        log.warning("resuming on %d processes, the checkpoint ran on %d: same data position, not bit-exact",
                    world, saved.world_size)
    return saved


def read_history(checkpoint: Path, out: Path, step: int) -> list[dict[str, float]]:
    """The logged steps up to `step`: the checkpoint's history.json, else out/history.json, else none."""
    path = checkpoint / HISTORY_FILE
    if not path.is_file():
        path = out / HISTORY_FILE  # a checkpoint of an older umo
    if not path.is_file():
        return []
    return [h for h in json.loads(path.read_text()) if h["step"] <= step]


def start_tracking(run: Run, tracking: TrackingConfig, manifest: str | Path, *, resumed: bool) -> None:
    """Open the MLflow run (the checkpoint's when there is one) on the main process, and log what the training
    depends on, and only that: the settings of the sections the train stage reads (`TRACKED`), the training
    manifest as the run's training dataset (name, path, md5 digest, samples), the data and the processes; source
    tags (git commit, DVC stage); and start MLflow's system metrics."""
    config, tc = run.config, run.config.train
    run.tracker = Tracker(uri=tracking_uri(tracking.tracking_uri), experiment=tracking.experiment,
                          run_name=f"train-{run.out.name}", run_id=run.state.mlflow_run_id,
                          tags={"umo.stage": "train", "umo.toy_world": str(run.data.manifest.toy_world).lower(),
                                **source_tags("umo train")})
    run.state.mlflow_run_id = run.tracker.run_id
    d = config.to_dict()
    run.tracker.log_params(flatten({k: d[k] for k in TRACKED}) | flatten({"faces": {
        k: d["faces"][k] for k in ("detector", "embedder", "min_face_size")}}) | {
        "data.manifest": str(manifest), "data.manifest_sha256": sha256_file(manifest),
        "data.samples": len(run.data), "data.toy_world": run.data.manifest.toy_world, "dist.processes": run.world,
        "dist.total_batch": tc.batch_size * run.world * tc.gradient_accumulation_steps,
        "lora.trainable_parameters": sum(p.numel() for p in run.params.values())})
    run.tracker.log_inputs([dataset_record("train", manifest, items=len(run.data))], "training")
    if tracking.system_metrics_seconds:
        run.tracker.start_system_metrics(tracking.system_metrics_seconds)
    if resumed:
        run.logged = run.tracker.last_step("skipped_nonfinite")  # logged at every logged step, finite or not


# ------------------------------------------------------------------------------------------------ the step loop


def train_loop(run: Run) -> None:
    """Optimizer steps from state.step to train.max_steps. After a step, by its number: metrics every log_every
    steps and at the last, sample images every sample_every, a checkpoint every checkpoint_every and at the last.
    Ends the MLflow run: FINISHED, or FAILED when an exception leaves the loop."""
    tc, state, tracker = run.config.train, run.state, run.tracker
    # a bar at a terminal; elsewhere a line every 30 s and the orchestrator's progress file (umo.progress)
    progress = umo_progress(total=tc.max_steps, initial=state.step, desc="train", unit="step", disable=not run.main)
    status = "FAILED"
    try:
        while state.step < tc.max_steps:
            parts, last, grad_norm = optimizer_step(run)
            progress.update(1)
            if state.consecutive_nonfinite >= tc.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"the loss or gradient was non-finite for {state.consecutive_nonfinite} steps in a row (up to "
                    f"step {state.step}): training diverged; lower train.learning_rate or check the data. The "
                    f"last good checkpoint is in {run.out / 'checkpoints'}")
            if state.step % tc.log_every == 0 or state.step == tc.max_steps:
                log_step(run, parts, grad_norm, progress)
            if tracker and last and tc.sample_every and state.step % tc.sample_every == 0:
                log_samples(tracker, *last, state.step)
            if run.main and last and tc.judge_every and state.step % tc.judge_every == 0:
                check_with_judge(run, *last)
            if state.step % tc.checkpoint_every == 0 or state.step == tc.max_steps:
                save_checkpoint(run.accelerator, run.out, state, run.ema, keep=tc.checkpoints_total_limit,
                                history=run.history, run=run if run.sharded else None)
        status = "FINISHED"
    finally:
        progress.close()
        if tracker:
            tracker.end(status)


def log_samples(tracker: Tracker, batch: Batch, output: StepOutput, step: int) -> None:
    """The step's images in MLflow, keyed with the step (the UI's slider walks through them): `samples/grid`, a grid
    of each sample's references and x0_hat; `matching/<k>`, sample k's picture of the reward's matching."""
    tracker.log_image(sample_grid(batch, output.images), key="samples/grid", step=step)
    for k, picture in enumerate(matching_pictures(batch, output)):
        tracker.log_image(picture, key=f"matching/{k}", step=step)


def check_with_judge(run: Run, batch: Batch, output: StepOutput) -> None:
    """The judge's check of the reward on this step's last micro-batch (umo.train.guard), main process only:
    into MLflow (guard/*) and the step's history entry."""
    if run.judge_check is None:
        rc = run.config.reward
        run.judge_check = JudgeCheck(Judge.from_config(run.config.faces), kind=rc.kind,
                                     matched_weight=rc.matched_weight, unmatched_weight=rc.unmatched_weight)
    guard = run.judge_check(batch, output)
    log.info("step %d: judge check %s", run.state.step, {k: round(v, 4) for k, v in guard.items()})
    if run.history and run.history[-1]["step"] == run.state.step:
        run.history[-1].update(guard)
    if run.tracker:
        run.tracker.log_metrics(guard, run.state.step)


def optimizer_step(run: Run) -> tuple[list[dict[str, float]], tuple[Batch, StepOutput] | None, float]:
    """One optimizer step (`accumulate`, then clipping, AdamW, the LR schedule and the EMA) or, when a loss or
    the gradient norm is non-finite on any process, a skip, counted in the state. Advances state.step.

    Returns the micro-batches' scalars, the last micro-batch with its output (None when the first was
    non-finite) and the gradient norm (nan when the step was skipped before clipping).
    """
    tc, state = run.config.train, run.state
    parts, last, ok = accumulate(run)
    grad_norm = math.nan
    if ok:
        norm = run.accelerator.clip_grad_norm_(list(run.params.values()), tc.max_grad_norm or math.inf)
        grad_norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)  # FSDP2: a DTensor
        ok = math.isfinite(grad_norm)
    if ok:
        run.optimizer.step()
        run.scheduler.step()
        if run.ema is not None:
            run.ema.update()
        state.consecutive_nonfinite = 0
    else:
        state.skipped_nonfinite += 1
        state.consecutive_nonfinite += 1
        log.warning("step %d: non-finite loss or gradient on some process: step skipped (%d in a row)",
                    state.step, state.consecutive_nonfinite)
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    return parts, last, grad_norm


def accumulate(run: Run) -> tuple[list[dict[str, float]], tuple[Batch, StepOutput] | None, bool]:
    """Forward and backward of the step's micro-batches (DDP syncs the gradients at the last). Stops, returning
    False, at the first micro-batch whose loss is non-finite on any process: all processes agree on it before
    anyone runs backward."""
    acc, tc, config = run.accelerator, run.config.train, run.config
    height, width = config.generator.resolution
    accum = tc.gradient_accumulation_steps
    parts, last = [], None
    for micro in range(accum):
        batch = run.data.batch(next_batch(run)).to(acc.device)
        rng = torch.Generator().manual_seed(draw_seed(config.seed, run.state.step, micro, run.rank))
        # Sharded, every process must run the transformer as many times (each call gathers the shards): the
        # gradient step t is then drawn alike on all of them
        t = draw_grad_step(tc.grad_step_range, torch.Generator().manual_seed(
            draw_seed(config.seed, run.state.step, micro, None))) if run.sharded else None
        sync = micro == accum - 1
        with (nullcontext() if sync else acc.no_sync(run.model)), acc.autocast():
            output = rerefl_step(run.gen, run.reward, batch, sampler_steps=tc.sampler_steps,
                                 grad_step_range=tc.grad_step_range, diff_weight=tc.diff_weight,
                                 reward_weight=tc.reward_weight, anchor_weight=tc.anchor_weight, height=height,
                                 width=width, generator=rng, grad_step=t)
            finite = torch.isfinite(output.loss.detach()).float().reshape(1)
            if acc.reduce(finite, reduction="sum").item() < run.world:
                return parts, last, False
            acc.backward(output.loss / accum)
        parts.append(output.scalars())
        last = (batch, output)
    return parts, last, True


def next_batch(run: Run) -> list[int]:
    """This process's next batch (sample indices); advances the data position (state.epoch, state.consumed)."""
    state, tc = run.state, run.config.train
    while True:
        if run.order is None or run.order[0] != state.epoch:
            batches = epoch_batches(run.data.reference_counts, batch_size=tc.batch_size, seed=run.config.seed,
                                    epoch=state.epoch)
            run.order = (state.epoch, shard(batches, run.rank, run.world))
        mine = run.order[1]
        k = state.consumed // run.world
        if k < len(mine):
            state.consumed += run.world
            return mine[k]
        state.epoch, state.consumed = state.epoch + 1, 0


def log_step(run: Run, parts: list[dict[str, float]], grad_norm: float, progress) -> None:
    """Reduce this step's metrics (a collective: every process calls it) into the history; the main process
    shows METRICS[0] on the progress bar and logs the finite ones to MLflow (unless it has the step already)."""
    state = run.state
    metrics = reduce_metrics(run.accelerator, parts) | {
        "lr": run.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
        "skipped_nonfinite": float(state.skipped_nonfinite)}
    run.history.append({"step": state.step, **metrics})
    if run.main:
        headline = METRICS[0]
        progress.set_postfix({headline: f"{metrics[headline]:.4f}"}, refresh=False)
        if run.tracker and state.step > run.logged:
            run.tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, state.step)


def reduce_metrics(accelerator: Accelerator, parts: list[dict[str, float]]) -> dict[str, float]:
    """METRICS: mean over micro-batches, then over processes (a collective: every process calls it); nan when
    the step has no finite micro-batch."""
    local = torch.tensor([np.mean([p[k] for p in parts]) if parts else math.nan for k in METRICS],
                         dtype=torch.float64, device=accelerator.device)
    mean = accelerator.reduce(local, reduction="mean")
    return dict(zip(METRICS, mean.tolist()))


# ------------------------------------------------------------------------------------------------ checkpoint


def save_checkpoint(accelerator, out: Path, state: TrainState, ema: LoraEMA | None, *, keep: int,
                    history: list[dict[str, float]] | None = None, run: Run | None = None) -> Path:
    """Write out/checkpoints/checkpoint-<step> atomically, then the `latest` pointer, then prune all but the
    newest `keep` checkpoints. accelerate's save_state writes into a temporary folder, renamed when complete.

    A checkpoint holds ONLY: the LoRA (pytorch_lora_weights.safetensors, diffusers format; the base model is
    never saved), the optimizer and LR-scheduler states and every process's RNG states (accelerate's files),
    train_state.json (`TrainState`), history.json (the metric history up to the step) and, when the EMA is on,
    ema.safetensors. `resume_run` restores it. A sharded run (`run` given: FSDP2) writes the LoRA, the
    optimizer's and the EMA's states as DCP shards instead, every process its own (umo.train.sharded).
    """
    root = out / "checkpoints"
    name = f"checkpoint-{state.step:06d}"
    final, tmp = root / name, root / f".{name}.tmp"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if run is not None:
        sharded.save_sharded(tmp, run.model, run.optimizer, run.scheduler,
                             ema=None if ema is None else ema.shadow, pipeline=type(run.gen.pipe).__name__,
                             rank=run.rank, world=run.world)
    else:
        accelerator.save_state(str(tmp))
    if main:
        if ema is not None and run is None:
            save_safetensors(ema.shadow, tmp / EMA_FILE)
        atomic_write_json(tmp / STATE_FILE, asdict(state))
        atomic_write_json(tmp / HISTORY_FILE, history or [])
    accelerator.wait_for_everyone()
    if main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
        atomic_write_bytes(root / LATEST, (name + "\n").encode())
        for old in sorted(p for p in root.glob("checkpoint-*") if p.is_dir())[:-keep]:
            shutil.rmtree(old)
        log.info("checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


# ------------------------------------------------------------------------------------------------ export


def export(run: Run, started: float) -> TrainResult:
    """The final outputs: out/lora/ (the EMA's weights when the EMA is on; the live weights stay in the
    returned transformer), out/history.json and out/train_metrics.json (main process; the latter is also an
    MLflow artifact). train_metrics.json: step, skipped_nonfinite, processes, ema, seconds (since `started`)
    and final_<name> for SUMMARY_METRICS, the mean of the last 10 logged steps."""
    acc, ema, state = run.accelerator, run.ema, run.state
    if ema is not None:
        ema.swap()
    lora_dir = run.out / "lora"
    whole = sharded.gathered_lora(run.model) if run.sharded else None  # a collective: every process
    if run.main:
        save_lora(acc.unwrap_model(run.model), lora_dir, pipeline_cls=type(run.gen.pipe), state=whole)
    if ema is not None:
        ema.swap()
    tail = run.history[-10:]
    summary = {"step": state.step, "skipped_nonfinite": state.skipped_nonfinite, "processes": run.world,
               "ema": ema is not None, "seconds": round(time.perf_counter() - started, 2),
               **{f"final_{k}": float(np.mean([h[k] for h in tail]))
                  for k in SUMMARY_METRICS if tail and k in tail[0]}}
    if run.main:
        atomic_write_json(run.out / HISTORY_FILE, run.history)
        atomic_write_json(run.out / "train_metrics.json", summary)
        if run.tracker:
            run.tracker.log_artifact(run.out / "train_metrics.json")
    acc.wait_for_everyone()
    return TrainResult(state.step, lora_dir / LORA_FILE, summary, state.mlflow_run_id, acc.unwrap_model(run.model))
