"""One ReReFL training step, timed by phase, and the reference KV cache.

CPU (default, `--size tiny`): the embedded default's configuration from params.yaml (resolution, sampler steps
T, gradient-step range, lambda, LoRA) on the tiny FLUX.2 [klein] generator, batch 1, 3 references, the reward
built from a toy world's face models (`--toy-world`, default .cache/toy-world; built if missing). The tiny
generator paints no faces, so the reward's detector runs on the image for its cost and then reports 3 faces at
fixed places: the reward aligns, embeds and assigns 3 faces, as it would on a real image.

CUDA (`--size klein-4b`): a random-init transformer of FLUX.2-klein-4B's shape (5 double + 20 single blocks,
24 heads x 128, text width 7680), the real-size FLUX.2 VAE, a 3-layer text encoder of Qwen3-4B's width (the
prompt encoder is timed apart as `condition`), bf16 autocast, gradient checkpointing, 512x512, 3 references of
512x512; LoRA rank 16. Model FLOPs come from torch's FlopCounterMode on one step without checkpointing;
MFU = model FLOPs / (seconds x the GPU's dense bf16 peak).

Phases: condition (prompt + reference encoding), diff_loss (L_diff forward), sampling (no-grad steps to t),
grad_step (the forward with gradient), decode (VAE, with gradient), reward, backward. Each is the median over
`--steps` measured steps after `--warmup`; the gradient step t is fixed to the middle of the range so steps
are comparable. Targets: (decode + reward) <= 25% of the step; the KV cache speeds no-grad sampling >= 1.3x
with 3 references (the same steps on a Flux2KleinKVPipeline folder with and without the cache), timed at the
step's sizes and with image and references at --kv-side px (256): at the embedded default's 64 px, 512 padded text
tokens outnumber the 3 x 16 reference tokens and each tiny forward costs ~12 ms of fixed overhead whatever its
length, unlike a real 512 px run (3072 reference tokens of 4608).

Families (`--family`, tiny size): flux2_klein (above), flux2_dev (Flux2Pipeline: embedded guidance, no KV
variant) and qwen_image_edit (QwenImageEditPlusPipeline: the text encoder reads the references too; no exact
reference cache, so the table shows instead what a cache could save at most: no-grad sampling with the references
against the same steps without them). CUDA (`--size qwen-image-edit`): a random-init transformer of
Qwen-Image-Edit's shape (60 blocks, 24 heads x 128, text width 3584: 20.4B parameters), the real-size Qwen VAE, a
3-layer text encoder of Qwen2.5-VL-7B's width, bf16, gradient checkpointing, 1024 x 1024 with 2 references.

`--memory-plan` (any machine, no GPU): the weights each family needs in bf16 at real size (the transformer's
parameters counted from its real shape on the meta device; the text encoders' published sizes), the LoRA and its
AdamW state, and what fits on one 141 GB H200 with gradient checkpointing. `--flop-plan` (any machine): the
klein-4B transformer's FLOPs in one step at 512 px with 3 references, counted on the meta device, and the least
time a step can take at each GPU's dense bf16 peak (benchmarks/results/flop_plan.json).

Prints a table and writes JSON (benchmarks/results/train_step[_<family>][_<size>].json).
Run: `.venv/bin/python benchmarks/train_step.py [--size tiny|klein-4b|qwen-image-edit] [--family F] [--steps 10]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from timing import Clock, sync

ROOT = Path(__file__).resolve().parents[1]
TARGET_DECODE_REWARD = 0.25
TARGET_KV_SPEEDUP = 1.3
PHASES = ("condition", "diff_loss", "sampling", "grad_step", "decode", "reward", "backward")
SUB_PHASES = {"reward": ("detection", "embedding")}  # timed inside their phase (and counted in it)
CLOCK: list = [None]  # the step's Clock, for the reward's sub-phases
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}  # dense


class DetectThenFixed:
    """Run a real detector for its cost, then report `faces` at fixed places (see the module docstring)."""

    def __init__(self, detector, fixed) -> None:
        self.detector, self.fixed = detector, fixed

    def detect_tensor(self, images: torch.Tensor):
        with CLOCK[0]("detection") if CLOCK[0] else nullcontext():
            self.detector.detect_tensor(images)
        return self.fixed.detect_tensor(images)


def timed_reward(base):
    """A MatchingReward subclass whose embedding of the generated faces is a timed sub-phase (`CLOCK`)."""

    class TimedReward(base):
        def embed(self, faces: torch.Tensor) -> torch.Tensor:
            with CLOCK[0]("embedding") if CLOCK[0] else nullcontext():
                return super().embed(faces)

    return TimedReward


def fixed_faces(height: int, width: int):
    from umo.toy.tiny.faces import FixedFaces

    size = min(width / 4, height / 2)
    return FixedFaces([(width * f, height / 2) for f in (0.2, 0.5, 0.8)], size)


# ------------------------------------------------------------------------------------------------ models


def tiny_setup(args, config):
    tmp = Path(tempfile.mkdtemp(prefix="umo-bench-"))
    if args.family == "qwen_image_edit":
        from umo.toy.tiny.qwen_image import write_tiny_qwen_image_edit

        return {"plain": write_tiny_qwen_image_edit(tmp / "tiny")}
    if args.family == "flux2_dev":
        from umo.toy.tiny.flux2_dev import write_tiny_flux2_dev

        return {"plain": write_tiny_flux2_dev(tmp / "tiny")}
    from umo.toy.tiny.flux2 import write_tiny_flux2

    return {"plain": write_tiny_flux2(tmp / "tiny"), "kv": write_tiny_flux2(tmp / "tiny_kv", kv=True)}


def qwen_image_edit_pipeline(depth: int | None):
    """In-memory Qwen-Image-Edit-Plus pipeline at the real transformer and VAE shape (random init; nothing
    downloaded), with a 3-layer text encoder of Qwen2.5-VL-7B's width."""
    from diffusers import AutoencoderKLQwenImage, QwenImageEditPlusPipeline, QwenImageTransformer2DModel

    from umo.toy.tiny.qwen_image import tiny_components

    parts = tiny_components()
    torch.manual_seed(0)
    encoder = parts["text_encoder"].config
    encoder.text_config.update(dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=3,
                                     num_attention_heads=28, num_key_value_heads=4, layer_types=["full_attention"] * 3,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                      "mrope_section": [16, 24, 24]}))  # Qwen2.5-VL-7B's
    encoder.vision_config.update(dict(out_hidden_size=3584))
    parts["text_encoder"] = type(parts["text_encoder"])(encoder).eval()
    parts["vae"] = AutoencoderKLQwenImage().eval()  # diffusers' defaults are Qwen-Image's VAE shape
    parts["transformer"] = QwenImageTransformer2DModel(**(QWEN_IMAGE_EDIT | ({"num_layers": depth} if depth else {})))
    return QwenImageEditPlusPipeline(**parts)


# the released Qwen-Image-Edit-2509 transformer's config (diffusers' defaults, spelled out)
QWEN_IMAGE_EDIT = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                       num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))
# FLUX.2 [dev]'s and [klein] 4B's transformers (their released configs)
FLUX2_DEV = dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
                 num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256, mlp_ratio=3.0,
                 axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=True)
FLUX2_KLEIN_4B = dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                      num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
                      axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False)
# published parameter counts of the text encoders (billions): Qwen2.5-VL-7B-Instruct, Mistral-Small-3.1-24B, Qwen3-4B
TEXT_ENCODERS = {"qwen_image_edit": ("Qwen2.5-VL-7B", 8.29), "flux2_dev": ("Mistral-Small-3.1-24B", 24.0),
                 "flux2_klein": ("Qwen3-4B", 4.02)}
H200_GB = 141.0


def memory_plan(rank: int = 16) -> dict:
    """Per family at real size: bf16 weights (transformer from its shape on the meta device, text encoder from
    its published size), the LoRA (rank `rank` on the attention projections) with fp32 AdamW state, and the
    verdict for one 141 GB GPU. Activations are not counted here (the GPU mode measures the peak)."""
    from diffusers import Flux2Transformer2DModel, QwenImageTransformer2DModel

    from umo.config import LoraConfig
    from umo.models.lora import lora_targets

    plans = {}
    for family, cls, shape in (("qwen_image_edit", QwenImageTransformer2DModel, QWEN_IMAGE_EDIT),
                               ("flux2_dev", Flux2Transformer2DModel, FLUX2_DEV),
                               ("flux2_klein", Flux2Transformer2DModel, FLUX2_KLEIN_4B)):
        with torch.device("meta"):
            model = cls(**shape)
        n = sum(p.numel() for p in model.parameters())
        modules = dict(model.named_modules())
        lora = sum(rank * (modules[t].in_features + modules[t].out_features)
                   for t in lora_targets(model, LoraConfig().target_modules))
        encoder, encoder_b = TEXT_ENCODERS[family]
        weights = 2 * (n + encoder_b * 1e9) / 1e9
        trainable = lora * (4 + 4 + 4 + 4) / 1e9  # fp32 weights, grads, AdamW's two moments
        plans[family] = {
            "transformer_params_b": n / 1e9, "text_encoder": encoder, "text_encoder_params_b": encoder_b,
            "bf16_weights_gb": weights, "lora_params_m": lora / 1e6, "lora_with_adamw_gb": trainable,
            "left_for_activations_gb": H200_GB - weights - trainable,
            "one_h200": ("fits, with room for activations" if H200_GB - weights - trainable > 40 else
                         "fits only with the text encoder offloaded or the prompts encoded ahead"
                         if H200_GB - 2 * n / 1e9 - trainable > 40 else "needs sharding (FSDP2)")}
    return plans


def flop_plan(sampler_steps: int, grad_step: int, side: int = 512, references: int = 3,
              text_tokens: tuple[int, ...] = (4, 512)) -> dict:
    """The klein-4B transformer's FLOPs in one ReReFL step, counted by torch's FlopCounterMode on the meta device
    (no weights, no GPU): a no-grad forward F, and a forward with the input's backward FB (the base is frozen: no
    weight gradients; the rank-16 LoRA's own are left out, under 1%). A step takes T - t no-grad forwards (the
    sampling) and two FB (L_diff and the gradient step); at a GPU's dense bf16 peak that is the least time a step
    can take, before the VAE, the text encoder and the reward, and before gradient checkpointing's second
    forward. Image and references at `side` px are (side / 16)^2 tokens each."""
    from diffusers import Flux2Transformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = Flux2Transformer2DModel(**FLUX2_KLEIN_4B).requires_grad_(False)
    image_tokens = (side // 16) ** 2
    seq = image_tokens * (1 + references)
    sampled = sampler_steps - grad_step
    plans = []
    for text in text_tokens:
        with torch.device("meta"):
            x = torch.empty(1, seq, FLUX2_KLEIN_4B["in_channels"], requires_grad=True)
            context = torch.empty(1, text, FLUX2_KLEIN_4B["joint_attention_dim"])
            img_ids, txt_ids = torch.zeros(1, seq, 4), torch.zeros(1, text, 4)
            timestep = torch.full((1,), 0.5)
        counts = []
        for length, backward in ((seq, False), (seq, True), (image_tokens, False)):
            counter = FlopCounterMode(display=False)
            with counter, torch.set_grad_enabled(backward):
                hidden = x[:, :length] if backward else x[:, :length].detach()
                out = model(hidden, context, timestep, img_ids[:, :length], txt_ids, return_dict=False)[0]
                if backward:
                    out.sum().backward()
            counts.append(float(counter.get_total_flops()))
        forward, forward_backward, image_only = counts
        step = sampled * forward + 2 * forward_backward
        # the reference KV cache: the first no-grad forward reads the references, the others only the image and
        # text (less the cached keys' and values' share of attention, which this leaves out: a lower bound)
        cached = forward + (sampled - 1) * image_only + 2 * forward_backward
        plans.append({"text_tokens": text, "tokens": seq + text, "forward_tflop": forward / 1e12,
                      "forward_backward_tflop": forward_backward / 1e12,
                      "forward_without_references_tflop": image_only / 1e12, "step_tflop": step / 1e12,
                      "step_tflop_reference_cache": cached / 1e12,
                      "floor_s": {gpu: step / (peak * 1e12) for gpu, peak in PEAK_BF16_TFLOPS.items()},
                      "floor_s_reference_cache": {gpu: cached / (peak * 1e12)
                                                  for gpu, peak in PEAK_BF16_TFLOPS.items()}})
    return {"model": "FLUX.2 [klein] 4B transformer", "params_b": sum(p.numel() for p in model.parameters()) / 1e9,
            "side": side, "references": references, "image_tokens": image_tokens, "sampler_steps": sampler_steps,
            "grad_step": grad_step, "no_grad_forwards": sampled, "forward_backwards": 2,
            "peak_bf16_tflops": PEAK_BF16_TFLOPS, "plans": plans}


def klein_4b_pipeline(kv: bool, depth: int | None):
    """In-memory klein pipeline at klein-4B transformer shape (random init; nothing downloaded)."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinKVPipeline,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from umo.toy.tiny.flux2 import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=2560, intermediate_size=9728, num_hidden_layers=3,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)).eval()
    vae = AutoencoderKLFlux2().eval()  # diffusers' defaults are FLUX.2's VAE shape
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=depth or 5, num_single_layers=depth or 20,
        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256,
        mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    cls = Flux2KleinKVPipeline if kv else Flux2KleinPipeline
    return cls(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
               is_distilled=True)


def make_generator(args, source, kv: bool, device: torch.device, dtype: torch.dtype):
    from umo.config import GeneratorConfig
    from umo.models import load_generator
    from umo.models.flux2 import Flux2KleinGenerator
    from umo.models.lora import add_lora
    from umo.models.qwen_image import QwenImageEditGenerator

    if args.size == "tiny":
        gen = load_generator(GeneratorConfig(family=args.family, path=str(source["kv" if kv else "plain"]),
                                             max_sequence_length=args.max_sequence_length), device=device, dtype=dtype)
    elif args.size == "qwen-image-edit":
        gen = QwenImageEditGenerator(qwen_image_edit_pipeline(args.depth).to(device, dtype))
    else:
        pipe = klein_4b_pipeline(kv, args.depth).to(device, dtype)
        gen = Flux2KleinGenerator(pipe, text_layers=(1, 2, 3), max_sequence_length=args.max_sequence_length)
    add_lora(gen.transformer, rank=args.rank, alpha=float(args.rank), target_modules=args.targets, seed=0,
             exclude=gen.dead_modules)
    for p in gen.transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if args.checkpointing:
        gen.transformer.enable_gradient_checkpointing()
    return gen


def make_reward(args, height: int, width: int, device: torch.device):
    from umo.config import load_config
    from umo.reward import MatchingReward
    from umo.toy.world.build import build_toyworld, load_toyworld

    if (args.toy_world / "toyworld_build.json").is_file():  # any built world, as it is
        world = load_toyworld(args.toy_world)
    else:
        world = build_toyworld(args.toy_world, load_config(ROOT / "params.yaml").section("toyworld")).world
    faces = load_config(ROOT / "params.yaml", world.faces_overrides())
    real = MatchingReward.from_config(faces.faces, faces.reward)
    reward = timed_reward(MatchingReward)(DetectThenFixed(real.detector, fixed_faces(height, width)), real.embedder,
                                          kind=faces.reward.kind)
    return reward.to(device), world


# ------------------------------------------------------------------------------------------------ runs


def batch_for(args, height: int, width: int, ref_hw, device: torch.device, embed_dim: int):
    from umo.train.rerefl import Batch

    g = torch.Generator().manual_seed(0)
    refs = [[torch.rand(3, *ref_hw, generator=g) * 2 - 1 for _ in range(args.references)] for _ in range(args.batch)]
    emb = [torch.nn.functional.normalize(torch.randn(args.references, embed_dim, generator=g), dim=1)
           for _ in range(args.batch)]
    targets = torch.rand(args.batch, 3, height, width, generator=g) * 2 - 1
    return Batch(["three people at a picnic, smiling"] * args.batch, refs, emb, targets).to(device)


def time_steps(gen, reward, batch, args, tc, height, width, device, autocast) -> tuple[dict, float]:
    from umo.train.rerefl import rerefl_step

    mid = (tc.grad_step_range[0] + tc.grad_step_range[1] + 1) // 2
    runs = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        timer = CLOCK[0] = Clock(device)
        t0 = time.perf_counter()
        with autocast():
            out = rerefl_step(gen, reward, batch, sampler_steps=tc.sampler_steps, grad_step_range=[mid, mid],
                              diff_weight=tc.diff_weight, height=height, width=width,
                              generator=torch.Generator().manual_seed(i), timer=timer)
        with timer("backward"):
            out.loss.backward()
        gen.transformer.zero_grad(set_to_none=True)
        sync(device)
        timer.times["step"] = time.perf_counter() - t0
        if i >= args.warmup:
            runs.append(dict(timer.times))
    CLOCK[0] = None
    names = (*PHASES, *(n for subs in SUB_PHASES.values() for n in subs), "step")
    med = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in names}
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else _rss_gib()
    return med, peak


def time_sampling(gen, batch, args, tc, height, width, autocast, device) -> float:
    """No-grad sampling over all T steps (a fresh Conditioning each time, as in training); median seconds."""
    from umo.models.base import sample

    times = []
    for i in range(args.warmup + args.steps):
        with torch.no_grad(), autocast():
            cond = gen.condition(batch.prompts, batch.references, height=height, width=width)
            if args.drop_references:  # what a perfect reference cache would leave: the image and text tokens
                cond.references = None
                cond.extra["img_shapes"] = [shapes[:1] for shapes in cond.extra["img_shapes"]]
            x = gen.initial_latents(cond, torch.Generator().manual_seed(i))
            sync(device)
            t0 = time.perf_counter()
            sample(gen, cond, tc.sampler_steps, latents=x)
            sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def model_flops(gen, reward, batch, tc, height, width, autocast) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from umo.train.rerefl import rerefl_step

    mid = (tc.grad_step_range[0] + tc.grad_step_range[1] + 1) // 2
    checkpointing = gen.transformer.is_gradient_checkpointing
    gen.transformer.disable_gradient_checkpointing()
    counter = FlopCounterMode(display=False)
    with counter, autocast():
        out = rerefl_step(gen, reward, batch, sampler_steps=tc.sampler_steps, grad_step_range=[mid, mid],
                          diff_weight=tc.diff_weight, height=height, width=width,
                          generator=torch.Generator().manual_seed(0))
        out.loss.backward()
    gen.transformer.zero_grad(set_to_none=True)
    if checkpointing:
        gen.transformer.enable_gradient_checkpointing()
    return float(counter.get_total_flops())


def _rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "klein-4b", "qwen-image-edit"], default="tiny")
    parser.add_argument("--family", choices=["flux2_klein", "flux2_dev", "qwen_image_edit"], default="flux2_klein",
                        help="tiny size: the family's tiny folder")
    parser.add_argument("--memory-plan", action="store_true", help="print the real-size memory plan and stop")
    parser.add_argument("--flop-plan", action="store_true",
                        help="count the klein-4B transformer's FLOPs per step (meta device) and stop")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--references", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=None, help="square size; default params (tiny) / 512")
    parser.add_argument("--depth", type=int, default=None, help="klein-4b: blocks per kind (smoke tests only)")
    parser.add_argument("--kv-side", type=int, default=256,
                        help="also time the KV cache with image and references of this size (0: skip)")
    parser.add_argument("--toy-world", type=Path, default=ROOT / ".cache" / "toy-world")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.drop_references = False
    if args.memory_plan:
        plans = memory_plan()
        print(plan_table(plans))
        out = args.out or ROOT / "benchmarks" / "results" / "memory_plan.json"
        out.write_text(json.dumps({"benchmark": "memory_plan", "gpu_gb": H200_GB, "families": plans}, indent=2) + "\n")
        print(f"\nwritten {out}")
        return 0
    if args.flop_plan:
        from umo.config import load_config

        tc = load_config(ROOT / "params.yaml").train
        plan = flop_plan(tc.sampler_steps, (tc.grad_step_range[0] + tc.grad_step_range[1] + 1) // 2)
        print(flop_table(plan))
        out = args.out or ROOT / "benchmarks" / "results" / "flop_plan.json"
        out.write_text(json.dumps({"benchmark": "flop_plan"} | plan, indent=2) + "\n")
        print(f"\nwritten {out}")
        return 0
    if args.size == "qwen-image-edit":
        args.family = "qwen_image_edit"

    from umo.config import load_config

    config = load_config(ROOT / "params.yaml")
    tc, device = config.train, torch.device(args.device)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    big = args.size != "tiny"
    if big and device.type != "cuda" and not args.depth:
        parser.error(f"--size {args.size} needs a CUDA GPU (or --depth 1 for a CPU smoke test)")
    side = args.resolution or ((1024 if args.size == "qwen-image-edit" else 512) if big
                               else config.generator.resolution[0])
    height = width = side
    ref_hw = (side, side) if big else tuple(config.generator.reference_resolution)
    if args.size == "qwen-image-edit" and args.references == 3:
        args.references = 2  # 2 x 4096 reference tokens beside the image's 4096
    args.rank = 16 if big else config.lora.rank
    args.targets = config.lora.target_modules
    args.checkpointing = big or tc.gradient_checkpointing
    args.max_sequence_length = config.generator.max_sequence_length
    bf16 = big and device.type == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)

    source = tiny_setup(args, config) if not big else None
    reward, world = make_reward(args, height, width, device)
    with torch.no_grad():
        embed_dim = reward.embed(torch.zeros(1, 3, 112, 112, device=device)).shape[1]
    results: dict = {}
    kv_variants = (False, True) if args.family == "flux2_klein" else (False,)
    for kv in kv_variants:
        gen = make_generator(args, source, kv, device, dtype)
        batch = batch_for(args, height, width, ref_hw, device, embed_dim)
        name = "kv" if kv else "plain"
        phases, peak = time_steps(gen, reward, batch, args, tc, height, width, device, autocast)
        results[name] = {"phases_s": phases, "peak_memory_gib": peak}
        if kv:  # at the step's sizes, and with image and references at --kv-side (the real pipeline's proportions)
            scenarios = [("step sizes", height, width, ref_hw)]
            if args.kv_side and (args.kv_side, args.kv_side) != ref_hw:
                scenarios.append((f"{args.kv_side}px image and refs", args.kv_side, args.kv_side,
                                  (args.kv_side, args.kv_side)))
            results["kv_cache"] = []
            for label, h, w, rhw in scenarios:
                b = batch_for(args, h, w, rhw, device, embed_dim)
                gen.reference_cache = False
                uncached = time_sampling(gen, b, args, tc, h, w, autocast, device)
                gen.reference_cache = True
                cached = time_sampling(gen, b, args, tc, h, w, autocast, device)
                results["kv_cache"].append({
                    "scenario": label, "resolution": [h, w], "reference_resolution": list(rhw),
                    "sampling_uncached_s": uncached, "sampling_cached_s": cached, "speedup": uncached / cached,
                    "target": TARGET_KV_SPEEDUP, "passed": uncached / cached >= TARGET_KV_SPEEDUP})
        if not kv and args.family == "qwen_image_edit":  # the most any reference cache could save
            results["reference_share"] = []
            scenarios = [("step sizes", height, width, ref_hw)]
            if args.kv_side and (args.kv_side, args.kv_side) != ref_hw:
                scenarios.append((f"{args.kv_side}px image and refs", args.kv_side, args.kv_side,
                                  (args.kv_side, args.kv_side)))
            for label, h, w, rhw in scenarios:
                b = batch_for(args, h, w, rhw, device, embed_dim)
                with_refs = time_sampling(gen, b, args, tc, h, w, autocast, device)
                args.drop_references = True
                without = time_sampling(gen, b, args, tc, h, w, autocast, device)
                args.drop_references = False
                results["reference_share"].append({
                    "scenario": label, "resolution": [h, w], "reference_resolution": list(rhw),
                    "sampling_with_references_s": with_refs, "sampling_without_references_s": without,
                    "upper_bound_speedup": with_refs / without, "target": TARGET_KV_SPEEDUP})
        if big and device.type == "cuda" and not kv:
            flops = model_flops(gen, reward, batch, tc, height, width, autocast)
            gpu = torch.cuda.get_device_name()
            peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
            results["flops"] = {"model_flops_per_step": flops, "gpu": gpu, "peak_bf16_tflops": peak_tflops,
                                "mfu": flops / phases["step"] / (peak_tflops * 1e12) if peak_tflops else None}
        del gen
    plain = results["plain"]["phases_s"]
    share = (plain["decode"] + plain["reward"]) / plain["step"]
    results["decode_reward_share"] = {"value": share, "target": TARGET_DECODE_REWARD,
                                      "passed": share <= TARGET_DECODE_REWARD}

    report = {"benchmark": "train_step", "size": args.size, "family": args.family, "device": str(device),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None},
              "settings": {"resolution": [height, width], "reference_resolution": list(ref_hw),
                           "references": args.references, "batch": args.batch, "sampler_steps": tc.sampler_steps,
                           "grad_step": (tc.grad_step_range[0] + tc.grad_step_range[1] + 1) // 2,
                           "diff_weight": tc.diff_weight, "lora_rank": args.rank, "bf16": bf16,
                           "gradient_checkpointing": args.checkpointing, "depth": args.depth,
                           "max_sequence_length": args.max_sequence_length,
                           "reward_embedder": world.config.reward.arch, "steps": args.steps},
              "results": results}
    print(table(report))
    family = "" if args.family == "flux2_klein" or args.size != "tiny" else f"_{args.family}"
    out = args.out or ROOT / "benchmarks" / "results" / (
        f"train_step{family}.json" if args.size == "tiny" else f"train_step_{args.size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten {out}")
    return 0


def table(report: dict) -> str:
    r = report["results"]
    lines = [f"ReReFL step, {report['family']} {report['size']} on {report['device']} "
             f"({report['settings']['resolution'][0]}px, {report['settings']['references']} refs, "
             f"T={report['settings']['sampler_steps']}, t={report['settings']['grad_step']})", "",
             f"{'phase':<11} {'plain s':>9} {'share':>6} {'kv s':>9}"]
    step = r["plain"]["phases_s"]["step"]
    kv = r.get("kv", {"phases_s": {}, "peak_memory_gib": float("nan")})
    rows = [(n, n) for n in PHASES] + [("step", "step")]
    for parent, subs in SUB_PHASES.items():
        at = rows.index((parent, parent)) + 1
        rows[at:at] = [(n, f"  {n}") for n in subs]
    for name, label in rows:
        a, b = r["plain"]["phases_s"].get(name, float("nan")), kv["phases_s"].get(name, float("nan"))
        lines.append(f"{label:<11} {a:9.4f} {a / step:6.1%} {b:9.4f}")
    lines.append(f"{'peak GiB':<11} {r['plain']['peak_memory_gib']:9.2f} {'':>6} {kv['peak_memory_gib']:9.2f}")
    s = r["decode_reward_share"]
    lines += ["", f"decode + reward share of the step: {s['value']:.1%} (target <= {s['target']:.0%}: "
              f"{'PASS' if s['passed'] else 'FAIL'})"]
    for k in r.get("reference_share", []):  # no exact cache in this family: the most one could save
        lines.append(f"no-grad sampling, {k['scenario']}: {k['sampling_with_references_s']:.4f} s with the "
                     f"references, {k['sampling_without_references_s']:.4f} s without them: any reference cache "
                     f"saves at most {k['upper_bound_speedup']:.2f}x (an exact one cannot exist here)")
    for k in r.get("kv_cache", []):
        lines.append(f"no-grad sampling, KV folder, {k['scenario']}: {k['sampling_uncached_s']:.4f} s uncached, "
                     f"{k['sampling_cached_s']:.4f} s cached: {k['speedup']:.2f}x (target >= {k['target']}x: "
                     f"{'PASS' if k['passed'] else 'FAIL'})")
    if "flops" in r:
        f = r["flops"]
        mfu = f"{f['mfu']:.1%}" if f["mfu"] is not None else "n/a (unknown GPU peak)"
        lines.append(f"model FLOPs/step {f['model_flops_per_step'] / 1e12:.1f} TFLOP on {f['gpu']}: MFU {mfu}")
    return "\n".join(lines)


def flop_table(plan: dict) -> str:
    lines = [f"{plan['model']} ({plan['params_b']:.2f}B), {plan['side']} px with {plan['references']} references of "
             f"{plan['side']} px ({plan['image_tokens']} tokens each); a step: {plan['no_grad_forwards']} no-grad "
             f"forwards (T={plan['sampler_steps']}, t={plan['grad_step']}) + {plan['forward_backwards']} forward-"
             "backwards", "",
             f"{'text':>5} {'tokens':>7} {'fwd TFLOP':>10} {'fwd+bwd':>8} {'no refs':>8} {'step':>7} {'cached':>7}  "
             + "  ".join(f"{gpu + ' floor':>12}" for gpu in plan["peak_bf16_tflops"])]
    for p in plan["plans"]:
        lines.append(f"{p['text_tokens']:5d} {p['tokens']:7d} {p['forward_tflop']:10.1f} "
                     f"{p['forward_backward_tflop']:8.1f} {p['forward_without_references_tflop']:8.1f} "
                     f"{p['step_tflop']:7.1f} {p['step_tflop_reference_cache']:7.1f}  "
                     + "  ".join(f"{p['floor_s'][gpu]:11.3f}s" for gpu in plan["peak_bf16_tflops"]))
    lines.append("(TFLOP; step: every forward reads the references; cached: the reference KV cache, a lower bound; "
                 "floor: the step at the GPU's dense bf16 peak)")
    return "\n".join(lines)


def plan_table(plans: dict) -> str:
    lines = [f"memory plan at real size, bf16 weights, LoRA rank 16 with fp32 AdamW, one {H200_GB:.0f} GB GPU", "",
             f"{'family':<16} {'transformer':>11} {'text encoder':>28} {'weights GB':>10} {'LoRA M':>7} "
             f"{'left GB':>8}  one H200"]
    for family, p in plans.items():
        lines.append(f"{family:<16} {p['transformer_params_b']:10.2f}B {p['text_encoder']:>22} "
                     f"{p['text_encoder_params_b']:4.1f}B {p['bf16_weights_gb']:10.1f} {p['lora_params_m']:7.1f} "
                     f"{p['left_for_activations_gb']:8.1f}  {p['one_h200']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
