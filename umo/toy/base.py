"""How the toy BASE generator is trained: a small FLUX.2 [klein] from scratch, on a CPU, in minutes.

`umo.toy.cast` builds the base (photos, then these steps, then its gate); this module holds the training:

1. `train_vae`: the klein VAE (`AutoencoderKLFlux2`, 2^(len(channels) - 1) x, `latent_channels`) trained as
   an autoencoder on random crops of the train targets and references (L1 + MSE + a tiny KL); its batch-norm
   statistics, which the pipeline normalizes latents with, are then measured on whole train images.
2. `train_base`: the transformer (Flux2KleinKV layout: reference tokens first, cacheable) trained from
   scratch with supervised flow matching (x_t = (1 - s) x0 + s noise, target v = noise - x0, s drawn with
   the sampler's shift: a static one, saved in the base's scheduler) on latents encoded once. The text encoder
   stays the tiny random one: toy prompts carry no identity, so the references are the only way to draw the
   right people.
3. `save_base`: the pipeline as a Flux2KleinKVPipeline folder (safetensors) with its markers.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

from umo.data.manifest import read_manifest
from umo.images import load_image, read_rgb, rgb_to_signed
from umo.io import atomic_dir
from umo.models.base import Conditioning
from umo.models.flux2 import TINY_MARKER
from umo.toy.config import ToyTransformerConfig, ToyVaeConfig
from umo.toy.tiny.flux2 import TINY_TEXT_LAYERS, TinyFlux2Config, tiny_components

log = logging.getLogger(__name__)

BASE_MARKER = "umo_toy_base.json"  # beside model_index.json: what this model is and how it was trained


def _reference_crop(image: np.ndarray, box: np.ndarray, scale: float, size: int) -> np.ndarray:
    x1, y1, x2, y2 = (float(c) for c in box)
    side = scale * max(x2 - x1, y2 - y1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    h, w = image.shape[:2]
    side = min(side, h, w)
    a = int(round(min(max(cx - side / 2, 0), w - side)))
    b = int(round(min(max(cy - side / 2, 0), h - side)))
    crop = image[b:b + int(side), a:a + int(side)]
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


# ------------------------------------------------------------------------------------------------ models


def new_components(vae: ToyVaeConfig, base: ToyTransformerConfig) -> dict:
    """Untrained base components: `umo.toy.tiny.flux2`'s text encoder and tokenizer; its scheduler, or one with
    the base's static shift; a VAE and a transformer of the configured sizes (seeded)."""
    tiny = TinyFlux2Config(latent_channels=vae.latent_channels, seed=base.seed)
    parts = tiny_components(tiny)
    if base.shift is not None:
        parts["scheduler"] = FlowMatchEulerDiscreteScheduler(shift=base.shift, use_dynamic_shifting=False)
    torch.manual_seed(vae.seed + 11)
    n = len(vae.channels)
    parts["vae"] = AutoencoderKLFlux2(
        block_out_channels=tuple(vae.channels), down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=1, latent_channels=vae.latent_channels,
        norm_num_groups=8, sample_size=128).eval()
    torch.manual_seed(base.seed + 12)
    parts["transformer"] = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * vae.latent_channels, num_layers=base.double_blocks,
        num_single_layers=base.single_blocks, attention_head_dim=base.head_dim, num_attention_heads=base.heads,
        joint_attention_dim=len(TINY_TEXT_LAYERS) * tiny.hidden, timestep_guidance_channels=32,
        axes_dims_rope=(base.head_dim // 4,) * 4, guidance_embeds=False).eval()
    return parts


def _load_signed(path: Path) -> torch.Tensor:
    """A PNG the toy base wrote -> (3, H, W) in [-1, 1], at its own size."""
    return rgb_to_signed(read_rgb(path))


def train_vae(vae, manifest_path: str | Path, cfg: ToyVaeConfig, *, log_every: int = 100) -> dict[str, float]:
    """Train `vae` in place as an autoencoder (see the module docstring); returns the final losses."""
    man = read_manifest(manifest_path)
    targets = [_load_signed(man.path(s.target)) for s in man.samples]
    # faces are what the judge and the reward look at: half the crops are reference crops (a face each)
    faces = [_load_signed(man.path(r.path)) for s in man.samples[:1000] for r in s.references[:1]]
    g = torch.Generator().manual_seed(cfg.seed)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.05)
    started, hist = time.perf_counter(), []
    for step in range(cfg.steps):
        crops = []
        for j in range(cfg.batch):
            pool = targets if j % 2 else faces
            img = pool[int(torch.randint(len(pool), (1,), generator=g))]
            h, w = img.shape[1:]
            c = min(cfg.crop, h, w)
            y, x = (int(torch.randint(0, h - c + 1, (1,), generator=g)), int(torch.randint(0, w - c + 1, (1,),
                                                                                            generator=g)))
            crops.append(img[:, y:y + c, x:x + c])
        x = torch.stack(crops).to(vae.device)
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=g)
        recon = vae.decode(z).sample
        l1, l2 = (recon - x).abs().mean(), F.mse_loss(recon, x)
        kl = posterior.kl().mean() / z[0].numel()
        loss = l1 + l2 + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        hist.append((l1.item(), l2.item(), kl.item()))
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            m = np.mean(hist[-log_every:], axis=0)
            log.info("vae step %d/%d: l1 %.4f mse %.4f kl %.1f (%.0f s)", step + 1, cfg.steps, m[0], m[1], m[2],
                     time.perf_counter() - started)
    vae.eval().requires_grad_(False)
    set_latent_statistics(vae, targets[:256])
    m = np.mean(hist[-log_every:], axis=0)
    return {"vae_l1": float(m[0]), "vae_mse": float(m[1]), "vae_kl": float(m[2]),
            "vae_seconds": round(time.perf_counter() - started, 1)}


@torch.no_grad()
def set_latent_statistics(vae, images: list[torch.Tensor]) -> None:
    """The VAE's batch-norm running mean/var := the patchified latents' statistics over `images` (the klein
    pipeline normalizes latents with them)."""
    lat = torch.cat([vae.encode(torch.stack(images[i:i + 16]).to(vae.device)).latent_dist.mode()
                     for i in range(0, len(images), 16)])
    b, c, h, w = lat.shape
    patches = lat.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
    vae.bn.running_mean.copy_(patches.mean(dim=(0, 2, 3)))
    vae.bn.running_var.copy_(patches.var(dim=(0, 2, 3)))


class _Encoded:
    """The train manifest encoded once: packed target latents, reference tokens and prompt embeddings, grouped
    by the number of references (a batch shares its reference layout)."""

    def __init__(self, gen, manifest_path: Path, resolution: tuple[int, int],
                 reference_resolution: tuple[int, int]) -> None:
        man = read_manifest(manifest_path)
        self.buckets: dict[int, dict[str, Any]] = {}
        prompts = sorted({s.prompt for s in man.samples})
        emb, ids = gen.encode_prompt(prompts)
        self.prompt = {p: (emb[i], ids[i]) for i, p in enumerate(prompts)}
        by_k: dict[int, list] = {}
        for s in man.samples:
            by_k.setdefault(len(s.references), []).append(s)
        for k, samples in sorted(by_k.items()):
            x0, refs, ref_ids, texts = [], [], None, []
            for i in range(0, len(samples), 32):
                chunk = samples[i:i + 32]
                targets = torch.stack([load_image(man.path(s.target), tuple(resolution)) for s in chunk])
                lat = gen.pipe._pack_latents(gen.encode_images(targets)).float()
                r, ref_ids = gen.encode_references(
                    [[load_image(man.path(r.path), tuple(reference_resolution)) for r in s.references]
                     for s in chunk])
                x0.append(lat)
                refs.append(r.float())
                texts += [s.prompt for s in chunk]
            self.buckets[k] = {"x0": torch.cat(x0), "refs": torch.cat(refs), "ref_ids": ref_ids[:1], "prompts": texts}
        self.n = len(man.samples)


def mismatch(refs: torch.Tensor, pool: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """A batch's references, each sample's replaced with probability p by those of a random sample of `pool`
    (the people drawn are then not the references': a confusion in the training data). A new tensor."""
    drop = torch.rand(len(refs), generator=g) < p
    refs = refs.clone()
    if drop.any():
        refs[drop] = pool[torch.randint(len(pool), (int(drop.sum()),), generator=g)].to(refs)
    return refs


def train_base(gen, manifest_path: str | Path, cfg: ToyTransformerConfig, *, resolution: tuple[int, int],
               reference_resolution: tuple[int, int], sampler_steps: int, log_every: int = 50) -> dict[str, float]:
    """Train `gen.transformer` in place with supervised flow matching (see the module docstring).
    resolution, reference_resolution: [height, width] px of the targets and of the references."""
    started = time.perf_counter()
    data = _Encoded(gen, Path(manifest_path), resolution, reference_resolution)
    log.info("base: %d samples encoded in %.0f s (%s)", data.n, time.perf_counter() - started,
             {k: len(b["prompts"]) for k, b in data.buckets.items()})
    tr = gen.transformer
    tr.train().requires_grad_(True)
    opt = torch.optim.AdamW(tr.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    g = torch.Generator().manual_seed(cfg.seed)
    keys = sorted(data.buckets)
    weights = torch.tensor([len(data.buckets[k]["prompts"]) for k in keys], dtype=torch.float)
    h, w = resolution
    latent_ids = gen.pipe._prepare_latent_ids(torch.empty((1, 1, h // gen.scale, w // gen.scale), device="meta"))
    latent_ids = latent_ids.to(gen.device)
    hist = []
    if cfg.compile:  # one graph: every batch has the same shapes (one reference layout per bucket)
        gen.denoiser = torch.compile(tr)
    ema = {n: p.detach().clone() for n, p in tr.named_parameters()} if cfg.ema_decay else None
    for step in range(cfg.steps):
        k = keys[int(torch.multinomial(weights, 1, generator=g))]
        b = data.buckets[k]
        idx = torch.randint(len(b["prompts"]), (cfg.batch,), generator=g)
        x0 = b["x0"][idx]
        prompt = torch.stack([data.prompt[b["prompts"][i]][0] for i in idx.tolist()])
        prompt_ids = torch.stack([data.prompt[b["prompts"][i]][1] for i in idx.tolist()])
        refs = b["refs"][idx]
        if cfg.mismatch_p > 0:
            refs = mismatch(refs, b["refs"], cfg.mismatch_p, g)
        cond = Conditioning(prompt, prompt_ids, refs, b["ref_ids"].expand(cfg.batch, -1, -1),
                            latent_ids.expand(cfg.batch, -1, -1), h, w)
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        s = gen.shift(torch.rand(cfg.batch, generator=g), sampler_steps, cond).to(x0)
        x_t = (1 - s.view(-1, 1, 1)) * x0 + s.view(-1, 1, 1) * noise
        loss = F.mse_loss(gen.velocity(x_t, s, cond), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.parameters(), 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            with torch.no_grad():
                for n, p in tr.named_parameters():
                    ema[n].lerp_(p, 1.0 - cfg.ema_decay)
        hist.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            log.info("base step %d/%d: flow-matching loss %.4f (%.0f s)", step + 1, cfg.steps,
                     np.mean(hist[-log_every:]), time.perf_counter() - started)
    gen.denoiser = tr
    if ema is not None:  # the saved base is the EMA of the weights
        with torch.no_grad():
            for n, p in tr.named_parameters():
                p.copy_(ema[n])
    tr.eval().requires_grad_(False)
    return {"base_loss": float(np.mean(hist[-log_every:])), "base_seconds": round(time.perf_counter() - started, 1)}


def save_base(gen, out: str | Path, info: dict[str, Any]) -> Path:
    """The trained pipeline as a Flux2KleinKVPipeline folder (safetensors), with its marker; atomic."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        gen.pipe.save_pretrained(tmp, safe_serialization=True)
        marker = {"text_layers_used": list(TINY_TEXT_LAYERS),
                  "note": "the toy world's base generator (umo.toy.base); not a real model"}
        (tmp / TINY_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        (tmp / BASE_MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out
