"""Qwen-Image-Edit-Plus (2509, 2511) through diffusers: a second `Generator` family, multi-reference natively.

Loaded from a local diffusers folder (`QwenImageEditPlusPipeline` layout: transformer/, vae/, text_encoder/,
tokenizer/, processor/, scheduler/) with `local_files_only=True` and `use_safetensors=True`. The pipeline's own
helpers do the bookkeeping, so the sampler sees exactly the tensors `QwenImageEditPlusPipeline.__call__` builds:

- prompt: Qwen2.5-VL reads the prompt *and the reference images* ("Picture 1: <image> Picture 2: <image> ...",
  each reference resized to `condition_area` pixels, 384 x 384 in the pipeline) -> its last hidden states, the
  template's first tokens dropped -> (B, L, 3584) and a mask where prompts differ in length;
- references: each image VAE-encoded (posterior mode; the Qwen VAE is a video VAE: one frame), normalized by
  the VAE's latents_mean/std, packed 2x2 and concatenated after the image tokens; their shapes go to the
  transformer as `img_shapes` (its RoPE; the 2511 transformer also modulates reference tokens at time 0);
- velocity: the transformer on [image tokens, reference tokens] at timestep sigma, keeping the image tokens;
- guidance: true classifier-free guidance on a negative prompt (" ", the pipeline's usual one) when
  `guidance_scale` > 1, with the pipeline's rescaling of the combined velocity to the conditional one's norm.

The pipeline resizes the references it is given to `VAE_IMAGE_SIZE` (1024 x 1024) pixels; here the references
are used at the size they come in (`generator.reference_resolution`), as the klein family does.

No reference KV cache: in this transformer every reference token attends to the noisy image tokens in every
block (joint attention), so its keys and values change with the image at each step; a cache would be an
approximation. benchmarks/train_step.py measures what such an approximation would save.

transformers builds a Qwen2VLProcessor only with torchvision installed (for its video processor). Without it,
the folder's processor/ (tokenizer and image processor) is loaded into `ImageTextProcessor`, the same class
without a video processor; umo never passes video.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions, calculate_shift
from PIL import Image
from transformers import Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor
from transformers.utils import is_torchvision_available

from umo.images import signed_to_rgb
from umo.models.base import Conditioning, check_references
from umo.models.flux2 import TINY_MARKER, check_safetensors

log = logging.getLogger(__name__)

PIPELINES = ("QwenImageEditPlusPipeline",)
EXPECTED_LAYOUT = ("a diffusers QwenImageEditPlusPipeline folder: model_index.json, transformer/, vae/, "
                   "text_encoder/, tokenizer/, processor/, scheduler/")
CONDITION_AREA = 384 * 384  # pixels of each reference as the text encoder sees it (the pipeline's)
NEGATIVE_PROMPT = " "


class ImageTextProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without a video processor (see the module docstring)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def load_processor(folder: Path) -> Qwen2VLProcessor:
    """The pipeline's processor from `folder` (its processor/): transformers' own where it can build one, else
    an ImageTextProcessor of the same tokenizer and image processor."""
    if is_torchvision_available():  # transformers then builds the video processor too
        return Qwen2VLProcessor.from_pretrained(folder, local_files_only=True)
    return ImageTextProcessor(image_processor=Qwen2VLImageProcessor.from_pretrained(folder, local_files_only=True),
                              tokenizer=Qwen2Tokenizer.from_pretrained(folder, local_files_only=True),
                              video_processor=None)


class QwenImageEditGenerator:
    """`umo.models.base.Generator` for Qwen-Image-Edit-Plus (see the module docstring).

    pipe: a loaded QwenImageEditPlusPipeline (its modules and helpers are used, its __call__ is not).
    guidance_scale: true classifier-free guidance on NEGATIVE_PROMPT when > 1 (the pipeline's `true_cfg_scale`;
    Qwen-Image-Edit's usual value is 4). The two branches run one after the other, as in the pipeline.
    condition_area: pixels of each reference as the text encoder sees it.
    """

    family = "qwen_image_edit"

    def __init__(self, pipe, *, guidance_scale: float = 1.0, condition_area: int = CONDITION_AREA) -> None:
        self.pipe = pipe
        self.guidance_scale = float(guidance_scale)
        self.condition_area = int(condition_area)
        self.transformer = pipe.transformer
        self.denoiser = pipe.transformer  # what velocity() calls: the transformer or its DDP/FSDP wrapper
        self.vae = pipe.vae
        self.text_encoder = pipe.text_encoder
        self.scheduler = pipe.scheduler
        self.scale = int(pipe.vae_scale_factor) * 2  # pixels per image token side (VAE 8x, then 2x2 patches)
        self.channels = int(self.vae.config.z_dim)
        for module in (self.vae, self.text_encoder, self.transformer):
            module.requires_grad_(False)
        self.vae.eval()
        self.text_encoder.eval()

    @property
    def dead_modules(self) -> tuple[str, ...]:
        """The last block's text-stream outputs: the transformer returns the image tokens only, so its text
        queries, text attention output and text MLP never reach the velocity (a LoRA there would never train)."""
        last = f"transformer_blocks.{len(self.transformer.transformer_blocks) - 1}"
        return tuple(name for name, _ in self.transformer.named_modules()
                     if name.startswith((f"{last}.attn.add_q_proj", f"{last}.attn.to_add_out", f"{last}.txt_mlp",
                                         f"{last}.txt_mod")))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, guidance_scale: float = 1.0, condition_area: int = CONDITION_AREA,
                        dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> QwenImageEditGenerator:
        """Load a local QwenImageEditPlusPipeline folder. Raises FileNotFoundError naming the folder, and
        ValueError naming the component whose weights are not safetensors."""
        path = Path(path).expanduser()
        index_file = path / "model_index.json"
        if not index_file.is_file():
            raise FileNotFoundError(f"generator folder {path}: no model_index.json (expected {EXPECTED_LAYOUT}); "
                                    "weights are never downloaded, put them there")
        index = json.loads(index_file.read_text())
        if index.get("_class_name") not in PIPELINES:
            raise ValueError(f"generator folder {path}: model_index.json names {index.get('_class_name')!r}; the "
                             f"qwen_image_edit family reads {' or '.join(PIPELINES)}")
        check_safetensors(path, index)
        pipe = diffusers.QwenImageEditPlusPipeline.from_pretrained(
            path, local_files_only=True, use_safetensors=True, dtype=dtype,
            processor=load_processor(path / "processor"))
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
        log.info("generator %s loaded from %s (%s)", cls.family, path,
                 "tiny test model" if (path / TINY_MARKER).is_file() else index.get("_class_name"))
        return cls(pipe, guidance_scale=guidance_scale, condition_area=condition_area)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    # ------------------------------------------------------------------ conditioning

    def condition_images(self, images: Sequence[torch.Tensor]) -> list[Image.Image]:
        """Reference images (3, h, w) in [-1, 1] -> the PIL images the text encoder sees: each resized to
        condition_area pixels as the pipeline resizes them (its image processor, from 8-bit RGB)."""
        out = []
        for img in images:
            rgb = Image.fromarray(signed_to_rgb(img.detach().float().cpu()))
            width, height = calculate_dimensions(self.condition_area, rgb.width / rgb.height)
            out.append(self.pipe.image_processor.resize(rgb, height, width))
        return out

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str],
                      references: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, L, D) prompt embeddings (zero-padded to the longest) and their (B, L) mask, None when no prompt is
        padded. Each sample is read with its own references, one at a time (the pipeline takes one)."""
        embeds = []
        for prompt, refs in zip(prompts, references):
            images = self.condition_images(refs) if len(refs) else None
            e, _ = self.pipe._get_qwen_prompt_embeds(prompt, images, device=self.device, dtype=self.transformer.dtype)
            embeds.append(e[0])
        longest = max(e.shape[0] for e in embeds)
        mask = torch.zeros(len(embeds), longest, dtype=torch.long, device=self.device)
        for i, e in enumerate(embeds):
            mask[i, :e.shape[0]] = 1
        padded = torch.stack([torch.cat([e, e.new_zeros(longest - e.shape[0], e.shape[1])]) for e in embeds])
        return padded, (None if bool(mask.all()) else mask)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(K, 3, h, w) in [-1, 1] -> (K, N, 4C) normalized, packed latents (posterior mode)."""
        latents = self.pipe._encode_vae_image(images[:, :, None].to(self.device, self.vae.dtype), generator=None)
        k, c, _, h, w = latents.shape
        return self.pipe._pack_latents(latents, k, c, h, w)

    def encode(self, images: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Target images (B, 3, H, W) in [-1, 1] at cond's size -> packed clean latents x0 (B, N, 4C), no grad."""
        if tuple(images.shape[2:]) != (cond.height, cond.width):
            raise ValueError(f"target images are {tuple(images.shape[2:])}, the batch generates "
                             f"{(cond.height, cond.width)}")
        return self.encode_images(images).float()

    def encode_references(self, references: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, list]:
        """Per sample, its reference images (3, h, w) in [-1, 1] -> (B, R, 4C) tokens and their (1, h, w) token
        grids. Every sample of a batch needs the same number and sizes of references (the loader buckets);
        sizes must be multiples of 16 px."""
        check_references(references, self.scale)
        n_ref = len(references[0])
        tokens = self.encode_images(torch.stack([img for r in references for img in r]))  # (B * R, n, 4C)
        tokens = tokens.reshape(len(references), n_ref * tokens.shape[1], tokens.shape[2])
        grids = [(1, img.shape[1] // self.scale, img.shape[2] // self.scale) for img in references[0]]
        return tokens.to(self.transformer.dtype), grids

    def condition(self, prompts: Sequence[str], references: Sequence[Sequence[torch.Tensor]], *,
                  height: int, width: int) -> Conditioning:
        if len(prompts) != len(references):
            raise ValueError(f"{len(prompts)} prompts but {len(references)} reference lists")
        if height % self.scale or width % self.scale:
            raise ValueError(f"image size {height}x{width}: height and width must be multiples of {self.scale}")
        prompt, mask = self.encode_prompt(prompts, references)
        refs, grids = self.encode_references(references) if references and len(references[0]) else (None, [])
        h, w = height // self.scale, width // self.scale
        # (frame, row, column) of each generated token, row-major as `_pack_latents` packs; the transformer's
        # RoPE takes the grids themselves (img_shapes: the image's, then each reference's)
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        grid = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(1, h * w, 3)
        cond = Conditioning(prompt, None, refs, None, grid.expand(len(prompts), -1, -1).to(self.device), height, width)
        cond.extra |= {"prompt_mask": mask, "img_shapes": [[(1, h, w), *grids]] * len(prompts)}
        if self.guidance_scale > 1.0:
            cond.extra["negative"] = self.encode_prompt([NEGATIVE_PROMPT] * len(prompts), references)
        return cond

    # ------------------------------------------------------------------ sampling

    def initial_latents(self, cond: Conditioning, generator: torch.Generator | None = None) -> torch.Tensor:
        n = cond.latent_ids.shape[1]
        noise = torch.randn((cond.batch_size, n, 4 * self.channels), generator=generator, device="cpu",
                            dtype=torch.float32)
        return noise.to(self.device)

    def _mu(self, cond: Conditioning) -> float:
        c = self.scheduler.config
        return calculate_shift(cond.latent_ids.shape[1], c.get("base_image_seq_len", 256),
                               c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))

    def sigmas(self, num_steps: int, cond: Conditioning) -> torch.Tensor:
        """The pipeline's schedule: linspace(1, 1/T, T), shifted by its resolution-dependent mu (and stretched to
        the scheduler's shift_terminal, 0.02 for Qwen-Image), then 0."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=self._mu(cond),
                                     device="cpu")
        return self.scheduler.sigmas.to(torch.float32).clone()

    def shift(self, u: torch.Tensor, num_steps: int, cond: Conditioning) -> torch.Tensor:
        """Uniform times u in (0, 1) -> training noise levels with the scheduler's shift for this resolution (its
        dynamic mu, else its static shift). The terminal stretch is a property of a whole sampling schedule (it
        rescales by the schedule's last value), so it is not applied to single training times."""
        u = u.clamp(1e-4, 1 - 1e-4)
        if not self.scheduler.config.use_dynamic_shifting:
            shift = float(self.scheduler.config.shift)
            return shift * u / (1 + (shift - 1) * u)
        return self.scheduler.time_shift(self._mu(cond), 1.0, u)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, prompt: torch.Tensor, mask: torch.Tensor | None,
                 cond: Conditioning) -> torch.Tensor:
        n, dtype = x.shape[1], self.transformer.dtype
        hidden = x if cond.references is None else torch.cat([x, cond.references.to(x.dtype)], dim=1)
        out = self.denoiser(hidden_states=hidden.to(dtype), timestep=t.to(dtype), encoder_hidden_states=prompt.to(dtype),
                            encoder_hidden_states_mask=mask, img_shapes=cond.extra["img_shapes"], return_dict=False)[0]
        return out[:, :n].to(x.dtype)

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor | float, cond: Conditioning) -> torch.Tensor:
        b = latents.shape[0]
        t = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device).reshape(-1)
        t = t.expand(b) if t.numel() == 1 else t
        v = self._forward(latents, t, cond.prompt, cond.extra["prompt_mask"], cond)
        negative = cond.extra.get("negative")
        if negative is None:
            return v
        v_neg = self._forward(latents, t, negative[0], negative[1], cond)
        combined = v_neg + self.guidance_scale * (v - v_neg)
        return combined * (v.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))

    def decode(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Packed latents -> images (B, 3, H, W) clamped to [-1, 1]; differentiable (no torch.no_grad here)."""
        x = self.pipe._unpack_latents(latents, cond.height, cond.width, self.pipe.vae_scale_factor)
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1).to(x.device, x.dtype)
        std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1).to(x.device, x.dtype)
        image = self.vae.decode((x * std + mean).to(self.vae.dtype), return_dict=False)[0][:, :, 0]
        return image.float().clamp(-1.0, 1.0)

