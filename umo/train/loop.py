"""The ReReFL training recipe on accelerate: setup, train, save_checkpoint, resume.

One process per device (`accelerate launch` or `torchrun`; a plain `python` call is one process). Each process
holds the whole generator, trains the same LoRA, and takes its own shard of every epoch's batches
(`umo.train.data`); gradients are averaged across processes by DDP at the last micro-batch of a step.

One optimizer step = `gradient_accumulation_steps` micro-batches of `batch_size` samples per process, each a
`rerefl_step`; then clipping, AdamW, the LR schedule and the optional EMA of the LoRA.

Non-finite values: every process checks its loss, and the processes agree (an all-reduce) before anyone runs
backward. A non-finite loss or gradient norm on ANY process skips the optimizer step everywhere (counted in
`skipped_nonfinite`); `max_nonfinite_steps` of them in a row raise `NonFiniteLossError`.

Checkpoints and resume. Every `checkpoint_every` steps (and at the last) `out/checkpoints/checkpoint-<step>/`
is written by `accelerator.save_state` into a temporary folder, renamed when complete, and only then is the
pointer `out/checkpoints/latest` rewritten; older checkpoints beyond `checkpoints_total_limit` are deleted.
A checkpoint holds ONLY:
  - the LoRA (pytorch_lora_weights.safetensors, diffusers format; the base model is never saved),
  - optimizer and LR-scheduler states, every process's RNG states (accelerate's files),
  - train_state.json: step, data position (epoch, global batches consumed), non-finite counters, the MLflow
    run id and the settings that must not change on resume,
  - ema.safetensors when the EMA is on.
Resuming (`resume="latest"` or a checkpoint folder) restores all of it. Every random draw of a step comes from
a generator seeded by (seed, step, micro-batch, process), and the data order is a function of (seed, epoch),
so a run that stops (or crashes) after step N and is resumed gives the LoRA of the uninterrupted run. A resumed
run may raise `max_steps` (and change checkpoint/logging cadence); the LR schedule, defined over max_steps,
then bends from the resume point on. Resuming on a different number of processes continues from the same data
position, but it is then no longer bit-exact (different shards).

Outputs besides the checkpoints: `out/lora/` (the final LoRA), `out/train_metrics.json` (a summary) and
`out/history.json` (every logged step's metrics, those before a resume point kept).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from umo.config import Config, to_dict
from umo.data.manifest import load_embeddings, read_manifest
from umo.io import atomic_write_bytes, atomic_write_json, save_safetensors, sha256_file
from umo.models import load_generator
from umo.models.lora import LORA_FILE, add_lora, load_lora, lora_parameters, save_lora
from umo.train.data import TrainData, epoch_batches, shard
from umo.train.rerefl import Batch, rerefl_step

log = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
HISTORY_FILE = "history.json"  # every logged step's metrics (the curves of MLflow, as a file)
EMA_FILE = "ema.safetensors"
LATEST = "latest"
# Settings a resumed run may change; any other difference from the checkpoint is an error.
RESUMABLE_CHANGES = {"train.max_steps", "train.checkpoint_every", "train.checkpoints_total_limit",
                     "train.log_every", "train.sample_every", "train.max_nonfinite_steps"}


class NonFiniteLossError(RuntimeError):
    """The loss or gradient was non-finite for `max_nonfinite_steps` optimizer steps in a row."""


class ResumeError(ValueError):
    """No usable checkpoint, or a checkpoint made with settings that may not change."""


@dataclass
class TrainState:
    """What train_state.json holds (see the module docstring)."""

    step: int = 0
    epoch: int = 0
    consumed: int = 0  # global batches of `epoch` consumed, all processes together
    skipped_nonfinite: int = 0
    consecutive_nonfinite: int = 0
    world_size: int = 1
    mlflow_run_id: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)


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


def draw_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The seed of one micro-batch's random draws: independent of everything that happened before it."""
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0])


def resume_settings(config: Config) -> dict[str, Any]:
    """The settings a checkpoint is tied to (flattened)."""
    from umo.tracking import flatten

    d = to_dict(config)
    return flatten({k: d[k] for k in ("seed", "generator", "lora", "reward", "train")})


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
    return ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def train(config: Config, *, manifest: str | Path, out: str | Path, resume: str | None = None, reward=None,
          tracking: bool = True) -> TrainResult:
    """Train the LoRA on `manifest`'s samples into `out` (see the module docstring).

    reward: a ready `MatchingReward` (tests inject one); None builds it from config.faces / config.reward.
    tracking: log to MLflow (main process only).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from diffusers.optimization import get_scheduler

    tc = config.train
    out = Path(out)
    use_cuda = torch.cuda.is_available()
    precision = tc.mixed_precision if use_cuda else "no"
    accelerator = Accelerator(cpu=not use_cuda, mixed_precision=precision, step_scheduler_with_optimizer=False,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        # Their save_state writes the whole sharded model before any hook can keep it to the LoRA.
        raise NotImplementedError(f"{accelerator.distributed_type.name}: LoRA-only checkpoints are implemented for "
                                  "one process and DDP; klein-4B with a LoRA fits one GPU per process, so use "
                                  "infra/accelerate/ddp_8gpu.yaml")
    if not main:
        logging.getLogger("umo").setLevel(logging.WARNING)
    set_seed(config.seed, device_specific=True)  # only LoRA dropout draws from the global RNG
    if precision != tc.mixed_precision:
        log.info("mixed_precision %s needs a GPU: training in fp32 on the CPU", tc.mixed_precision)

    # ---------------------------------------------------------------- setup: data, model, reward, optimizer
    man = read_manifest(manifest)
    embeddings = load_embeddings(man)
    data = TrainData(man, embeddings, resolution=config.generator.resolution,
                     reference_resolution=config.generator.reference_resolution)
    if data.batches_per_epoch(tc.batch_size, world) == 0:
        raise ValueError(f"{manifest}: {len(data)} samples give no full batch of {tc.batch_size} per process on "
                         f"{world} processes (samples of a batch share their number of references)")
    if reward is None:
        from umo.reward import MatchingReward

        recorded = man.embedder.get("sha256")
        if recorded and recorded != sha256_file(config.faces.embedder.path):
            raise ValueError(f"{manifest}: its reference embeddings were made by another embedder than "
                             f"{config.faces.embedder.path} (sha256 differs): re-run `umo prepare`")
        reward = MatchingReward.from_config(config.faces, config.reward)
    reward = reward.to(accelerator.device)

    weight_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = load_generator(config.generator, dtype=weight_dtype, device=accelerator.device)
    transformer = gen.transformer
    add_lora(transformer, rank=config.lora.rank, alpha=config.lora.alpha, target_modules=config.lora.target_modules,
             dropout=config.lora.dropout, seed=config.seed)
    for p in lora_parameters(transformer):  # trained in fp32 whatever the frozen weights are
        p.data = p.data.float()
    if tc.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    named = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(list(named.values()), lr=tc.learning_rate, weight_decay=tc.weight_decay)
    scheduler = get_scheduler(tc.lr_scheduler, optimizer, num_warmup_steps=tc.warmup_steps,
                              num_training_steps=tc.max_steps)
    model, optimizer, scheduler = accelerator.prepare(transformer, optimizer, scheduler)
    gen.denoiser = model
    ema = LoraEMA(named, tc.ema_decay) if tc.ema_decay else None

    def save_hook(models, weights, output_dir):  # only the LoRA, never the base weights
        if main:
            save_lora(accelerator.unwrap_model(models[0]), output_dir)
        weights.clear()

    def load_hook(models, input_dir):
        load_lora(accelerator.unwrap_model(models[0]), Path(input_dir) / LORA_FILE)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    # ---------------------------------------------------------------- resume
    state = TrainState(world_size=world, settings=resume_settings(config))
    checkpoint = find_checkpoint(out, resume) if resume else None
    if resume and checkpoint is None:
        log.info("resume=%s: no checkpoint in %s, starting from step 0", resume, out / "checkpoints")
    if checkpoint is None and (out / "checkpoints" / LATEST).exists():
        raise ResumeError(f"{out}: holds checkpoints of an earlier run; pass resume='latest' (--resume latest) "
                          "to continue it, or choose another output folder")
    if checkpoint is not None:
        saved = TrainState(**json.loads((checkpoint / STATE_FILE).read_text()))
        changed = sorted(k for k in set(saved.settings) | set(state.settings)
                         if saved.settings.get(k) != state.settings.get(k) and k not in RESUMABLE_CHANGES)
        if changed:
            raise ResumeError(f"{checkpoint}: made with other settings for {changed[:5]}; these may not change "
                              "on resume (start a new output folder instead)")
        if saved.world_size != world:
            log.warning("resuming on %d processes, the checkpoint ran on %d: same data position, not bit-exact",
                        world, saved.world_size)
        accelerator.load_state(str(checkpoint))
        if ema is not None:
            from safetensors.torch import load_file

            ema.shadow = load_file(str(checkpoint / EMA_FILE))
        state = TrainState(**{**asdict(saved), "world_size": world, "settings": state.settings})
        log.info("resumed from %s at step %d (epoch %d, %d batches in)", checkpoint, state.step, state.epoch,
                 state.consumed)

    tracker = None
    if tracking and main:
        from umo.tracking import Tracker, flatten, tracking_uri

        tracker = Tracker(uri=tracking_uri(config.tracking.tracking_uri), experiment=config.tracking.experiment,
                          run_name=f"train-{out.name}", run_id=state.mlflow_run_id,
                          tags={"umo.stage": "train", "umo.toy_world": str(man.toy_world).lower()})
        state.mlflow_run_id = tracker.run_id
        tracker.log_params(flatten(to_dict(config)) | {
            "data.manifest": str(manifest), "data.manifest_sha256": sha256_file(manifest),
            "data.samples": len(data), "data.toy_world": man.toy_world, "dist.processes": world,
            "dist.total_batch": tc.batch_size * world * tc.gradient_accumulation_steps,
            "lora.trainable_parameters": sum(p.numel() for p in named.values())})

    # ---------------------------------------------------------------- train
    epochs: dict[int, list[list[int]]] = {}

    def next_batch() -> list[int]:
        while True:
            if state.epoch not in epochs:
                epochs.clear()
                epochs[state.epoch] = shard(epoch_batches(data.reference_counts, batch_size=tc.batch_size,
                                                          seed=config.seed, epoch=state.epoch), rank, world)
            mine = epochs[state.epoch]
            k = state.consumed // world
            if k < len(mine):
                state.consumed += world
                return mine[k]
            state.epoch, state.consumed = state.epoch + 1, 0

    height, width = config.generator.resolution
    accum = tc.gradient_accumulation_steps
    history: list[dict[str, float]] = []
    if checkpoint is not None:  # the steps up to the checkpoint: saved in it (a crashed run wrote no history.json)
        saved_history = checkpoint / HISTORY_FILE
        if not saved_history.is_file():
            saved_history = out / HISTORY_FILE  # a checkpoint of an older umo
        if saved_history.is_file():
            history = [h for h in json.loads(saved_history.read_text()) if h["step"] <= state.step]
    started = time.perf_counter()
    logged = tracker.last_step("loss") if tracker and checkpoint is not None else 0
    progress = _progress(tc.max_steps, state.step, enabled=main)
    status = "FAILED"
    try:
        while state.step < tc.max_steps:
            parts, last, ok = [], None, True
            for micro in range(accum):
                batch = data.batch(next_batch()).to(accelerator.device)
                rng = torch.Generator().manual_seed(draw_seed(config.seed, state.step, micro, rank))
                sync = micro == accum - 1
                with (nullcontext() if sync else accelerator.no_sync(model)), accelerator.autocast():
                    out_step = rerefl_step(gen, reward, batch, sampler_steps=tc.sampler_steps,
                                           grad_step_range=tc.grad_step_range, diff_weight=tc.diff_weight,
                                           reward_weight=tc.reward_weight, height=height, width=width,
                                           generator=rng)
                    finite = torch.isfinite(out_step.loss.detach()).float().reshape(1)
                    if accelerator.reduce(finite, reduction="sum").item() < world:
                        ok = False
                        break
                    accelerator.backward(out_step.loss / accum)
                parts.append(out_step.scalars())
                last = (batch, out_step)
            grad_norm = math.nan
            if ok:
                grad_norm = float(accelerator.clip_grad_norm_(list(named.values()), tc.max_grad_norm or math.inf))
                ok = math.isfinite(grad_norm)
            if ok:
                optimizer.step()
                scheduler.step()
                if ema is not None:
                    ema.update()
                state.consecutive_nonfinite = 0
            else:
                state.skipped_nonfinite += 1
                state.consecutive_nonfinite += 1
                log.warning("step %d: non-finite loss or gradient on some process: step skipped (%d in a row)",
                            state.step, state.consecutive_nonfinite)
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            progress.update(1)

            if state.consecutive_nonfinite >= tc.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"the loss or gradient was non-finite for {state.consecutive_nonfinite} steps in a row (up to "
                    f"step {state.step}): training diverged; lower train.learning_rate or check the data. The "
                    f"last good checkpoint is in {out / 'checkpoints'}")
            if state.step % tc.log_every == 0 or state.step == tc.max_steps:
                metrics = _reduce_metrics(accelerator, parts) | {
                    "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                    "skipped_nonfinite": float(state.skipped_nonfinite)}
                history.append({"step": state.step, **metrics})
                if main:
                    progress.set_postfix(reward=f"{metrics.get('reward', math.nan):.4f}", refresh=False)
                    if tracker and state.step > logged:  # a resumed run re-runs steps MLflow already has
                        tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, state.step)
            if tracker and last and tc.sample_every and state.step % tc.sample_every == 0:
                tracker.log_image(sample_grid(last[0], last[1].images), f"samples/step_{state.step:06d}.png")
            if state.step % tc.checkpoint_every == 0 or state.step == tc.max_steps:
                save_checkpoint(accelerator, out, state, ema, keep=tc.checkpoints_total_limit, history=history)
        status = "FINISHED"
    finally:
        progress.close()
        if tracker:
            tracker.end(status)

    # ---------------------------------------------------------------- export the final LoRA
    if ema is not None:
        ema.swap()
    lora_dir = out / "lora"
    if main:
        lora = save_lora(accelerator.unwrap_model(model), lora_dir)
    if ema is not None:
        ema.swap()
    tail = history[-10:]
    summary = {"step": state.step, "skipped_nonfinite": state.skipped_nonfinite, "processes": world,
               "ema": ema is not None, "seconds": round(time.perf_counter() - started, 2),
               **{f"final_{k}": float(np.mean([h[k] for h in tail])) for k in
                  ("reward", "reward_matched", "reward_unmatched", "diff_loss", "faces_per_sample")
                  if tail and k in tail[0]}}
    if main:
        atomic_write_json(out / HISTORY_FILE, history)
        atomic_write_json(out / "train_metrics.json", summary)
        if tracker:
            tracker.log_artifact(out / "train_metrics.json")
    accelerator.wait_for_everyone()
    return TrainResult(state.step, lora_dir / LORA_FILE, summary, state.mlflow_run_id,
                       accelerator.unwrap_model(model))


def save_checkpoint(accelerator, out: Path, state: TrainState, ema: LoraEMA | None, *, keep: int,
                    history: list[dict[str, float]] | None = None) -> Path:
    """Write out/checkpoints/checkpoint-<step> atomically (with the metric history up to it), then the `latest`
    pointer, then prune old ones."""
    root = out / "checkpoints"
    name = f"checkpoint-{state.step:06d}"
    final, tmp = root / name, root / f".{name}.tmp"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if main:
        if ema is not None:
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


def _reduce_metrics(accelerator, parts: list[dict[str, float]]) -> dict[str, float]:
    """Mean over micro-batches, then over processes (a collective: every process calls it)."""
    keys = ["loss", "diff_loss", "reward", "reward_matched", "reward_unmatched", "faces_per_sample", "grad_step"]
    local = torch.tensor([np.mean([p[k] for p in parts]) if parts else math.nan for k in keys],
                         dtype=torch.float64, device=accelerator.device)
    mean = accelerator.reduce(local, reduction="mean")
    return dict(zip(keys, mean.tolist()))


def _progress(total: int, initial: int, *, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)
