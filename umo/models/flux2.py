"""FLUX.2 [klein] and [dev] through diffusers: one transformer family, multi-reference natively.

Loaded from a local diffusers folder (`Flux2KleinPipeline` or `Flux2Pipeline` layout: transformer/, vae/,
text_encoder/, tokenizer/, scheduler/) with `local_files_only=True` and `use_safetensors=True`: weights are never
downloaded, and never unpickled (a pickled .bin can run code; a folder holding one is an error). The pipeline's
own helpers do the token bookkeeping (patchify, pack, position ids, VAE batch-norm statistics), so our
sampler sees exactly the tensors `Flux2KleinPipeline.__call__` / `Flux2Pipeline.__call__` builds:

- prompt: the text encoder's chat template -> hidden states of `text_layers` stacked -> (B, L, 3 * hidden);
- references: each image VAE-encoded (mode of the posterior), patchified 2x2, normalized by the VAE's
  batch-norm statistics, packed and concatenated after the image tokens, at time coordinates 10, 20, ...;
- velocity: the transformer on [image tokens, reference tokens], keeping the image tokens' output.

The two differ only in what surrounds that (`Flux2KleinGenerator`, `Flux2DevGenerator`):

- [klein] (4B / 9B): Qwen3 text encoder (layers 9, 18, 27); classifier-free guidance on the empty prompt when
  `guidance_scale` > 1 (the base models; the distilled ones run without), both branches in one doubled batch.
- [dev] (32B): Mistral Small 3.1 text encoder (`Mistral3ForConditionalGeneration`; layers 10, 20, 30) reading
  the pipeline's system message, then the prompt; guidance-distilled: `guidance_scale` (default 4) goes to the
  transformer as its embedded guidance (`guidance=`), one forward per step, never a doubled batch; no KV variant.
  The pipeline's `tokenizer` component is a `PixtralProcessor`, which transformers builds only with torchvision
  installed (its image processor imports it). Without torchvision the pipeline is loaded without it and given
  the processor's own tokenizer instead (the same tokenizer files and chat template, read by AutoTokenizer as
  the processor would read them): the prompt embedding only ever applies the chat template to text messages,
  which the tokenizer does exactly as the processor does. Prompt upsampling (the pipeline's
  `caption_upsample_temperature`, a vision-language generation) is never used here.

The KV variant (`Flux2KleinKVPipeline` folders) puts the reference tokens FIRST, modulates them with a fixed
timestep and lets them attend only to themselves, so their keys and values depend on neither the noisy image
nor the time: they are computed once (diffusers' `kv_cache_mode="extract"`) and reused by every later no-grad
step of the same `Conditioning` (`"cached"`), exactly. Steps with gradient always run the full forward so the
gradient also flows through the reference tokens. Plain klein lets the references attend to the image tokens,
so it has no exact cache. A cache lives in its Conditioning: build a new one after the weights change.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_latents
from transformers import AutoTokenizer
from transformers.utils import is_torchvision_available

from umo.models.base import Conditioning, check_references

log = logging.getLogger(__name__)
TINY_MARKER = "umo_tiny.json"
"""Written beside model_index.json by tiny test models (umo.toy.tiny.flux2), so nobody mistakes them for real
weights: {"text_layers_used": [...], ...}, the text encoder's layers a tiny encoder feeds the transformer."""

DEFAULT_TEXT_LAYERS = (9, 18, 27)  # diffusers' klein default (Qwen3-4B hidden states)
DEV_TEXT_LAYERS = (10, 20, 30)  # diffusers' [dev] default (Mistral Small 3.1 hidden states)
EXPECTED_LAYOUT = "a diffusers Flux2KleinPipeline folder: model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/"
DEV_LAYOUT = ("a diffusers Flux2Pipeline folder: model_index.json, transformer/, vae/, text_encoder/, "
              "tokenizer/, scheduler/")


PIPELINES = ("Flux2KleinPipeline", "Flux2KleinKVPipeline")
DEV_PIPELINES = ("Flux2Pipeline",)
PICKLED = (".bin", ".pt", ".pth", ".ckpt")  # torch.save / pickle weight files, which diffusers would unpickle


def check_safetensors(path: Path, index: dict) -> None:
    """Raise ValueError, naming the folder and the component, where a component that model_index.json lists
    holds pickled weights (.bin, .pt, .pth, .ckpt) and no .safetensors: umo loads safetensors only."""
    for name, spec in index.items():
        folder = path / name
        if name.startswith("_") or not isinstance(spec, list) or not folder.is_dir():
            continue
        files = sorted(f.name for f in folder.iterdir() if f.is_file())
        pickled = [f for f in files if f.endswith(PICKLED)]
        if pickled and not any(f.endswith(".safetensors") for f in files):
            raise ValueError(f"generator folder {path}: component {name}/ holds only pickled weights "
                             f"({', '.join(pickled)}); umo loads weights from safetensors only: convert it "
                             f"(load it once and save_pretrained(..., safe_serialization=True))")


def _pipeline_cls(name: str = "Flux2KleinPipeline", family: str = "flux2_klein",
                  pipelines: Sequence[str] = PIPELINES):
    if name not in pipelines:
        raise ValueError(f"generator folder: model_index.json names {name!r}; the {family} family reads "
                         f"{' or '.join(pipelines)}")
    return getattr(diffusers, name)


class Flux2KleinGenerator:
    """`umo.models.base.Generator` for FLUX.2 [klein] (see the module docstring).

    pipe: a loaded Flux2KleinPipeline (its modules are used, its __call__ is not).
    text_layers: text-encoder hidden states stacked into the prompt embedding.
    max_sequence_length: prompt tokens (padded / truncated), as the pipeline's argument.
    guidance_scale: classifier-free guidance on the empty prompt when > 1 (the base klein pipeline uses 4;
    the distilled one none); the two branches run as one doubled batch.
    reference_cache: reuse the reference tokens' keys/values across no-grad steps (KV variant only).
    """

    family = "flux2_klein"
    dead_modules: tuple[str, ...] = ()  # the last single blocks carry text and image alike: every module counts
    pipelines = PIPELINES  # model_index.json's _class_name, one of these
    default_text_layers = DEFAULT_TEXT_LAYERS
    expected_layout = EXPECTED_LAYOUT

    def __init__(self, pipe, *, text_layers: Sequence[int] = DEFAULT_TEXT_LAYERS,
                 max_sequence_length: int = 512, guidance_scale: float = 1.0, reference_cache: bool = True) -> None:
        self.pipe = pipe
        self.kv = type(pipe).__name__ == "Flux2KleinKVPipeline"
        self.reference_cache = bool(reference_cache) and self.kv
        self.guidance_scale = float(guidance_scale)
        self.transformer = pipe.transformer
        self.denoiser = pipe.transformer  # what velocity() calls: the transformer or its DDP/FSDP wrapper
        self.vae = pipe.vae
        self.text_encoder = pipe.text_encoder
        self.tokenizer = pipe.tokenizer
        self.scheduler = pipe.scheduler
        self.text_layers = tuple(int(i) for i in text_layers)
        self.max_sequence_length = int(max_sequence_length)
        n_hidden = int(self.text_encoder.config.get_text_config().num_hidden_layers)  # Mistral3: its text model's
        if max(self.text_layers) > n_hidden:
            raise ValueError(f"text_layers {list(self.text_layers)}: the text encoder has only {n_hidden} layers")
        self.scale = int(pipe.vae_scale_factor) * 2  # pixels per image token side (VAE 8x, then 2x2 patches)
        for module in (self.vae, self.text_encoder, self.transformer):
            module.requires_grad_(False)
        self.vae.eval()
        self.text_encoder.eval()

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path: str | Path, *, text_layers: Sequence[int] | None = None,
                        max_sequence_length: int = 512, guidance_scale: float = 1.0, reference_cache: bool = True,
                        dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "Flux2KleinGenerator":
        """Load a local Flux2KleinPipeline folder. text_layers None: the folder's tiny marker if it has one
        (umo.toy.tiny.flux2), else diffusers' default (9, 18, 27). Raises FileNotFoundError naming the folder, and
        ValueError naming the component whose weights are not safetensors (`check_safetensors`) or a pipeline
        class of another family."""
        path = Path(path).expanduser()
        index_file = path / "model_index.json"
        if not index_file.is_file():
            raise FileNotFoundError(f"generator folder {path}: no model_index.json (expected {cls.expected_layout}); "
                                    "weights are never downloaded, put them there")
        index = json.loads(index_file.read_text())
        tiny_file = path / TINY_MARKER
        tiny = json.loads(tiny_file.read_text()) if tiny_file.is_file() else None
        if text_layers is None:
            text_layers = tiny["text_layers_used"] if tiny else cls.default_text_layers
        pipeline_cls = _pipeline_cls(index.get("_class_name", ""), cls.family, cls.pipelines)
        check_safetensors(path, index)
        pipe = cls._load_pipeline(pipeline_cls, path, dtype)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
        log.info("generator %s loaded from %s (%s)", cls.family, path, "tiny test model" if tiny
                 else index.get("_class_name"))
        return cls(pipe, text_layers=text_layers, max_sequence_length=max_sequence_length,
                   guidance_scale=guidance_scale, reference_cache=reference_cache)

    @classmethod
    def _load_pipeline(cls, pipeline_cls, path: Path, dtype: torch.dtype):
        return pipeline_cls.from_pretrained(path, local_files_only=True, use_safetensors=True, dtype=dtype)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    # ------------------------------------------------------------------ conditioning

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) prompt embeddings and (B, L, 4) text position ids."""
        embeds = self._prompt_embeds(prompts)
        return embeds, self.pipe._prepare_text_ids(embeds).to(self.device)

    def _prompt_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.pipe._get_qwen3_prompt_embeds(
            self.text_encoder, self.tokenizer, list(prompts), dtype=self.transformer.dtype, device=self.device,
            max_sequence_length=self.max_sequence_length, hidden_states_layers=self.text_layers)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(K, 3, h, w) in [-1, 1] -> (K, 4C, h/16, w/16) normalized, patchified latents (posterior mode)."""
        latents = retrieve_latents(self.vae.encode(images.to(self.device, self.vae.dtype)), sample_mode="argmax")
        latents = self.pipe._patchify_latents(latents)
        mean, std = self._bn_stats(latents)
        return (latents - mean) / std

    def encode(self, images: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Target images (B, 3, H, W) in [-1, 1] at cond's size -> packed clean latents x0 (B, N, C), no grad."""
        if tuple(images.shape[2:]) != (cond.height, cond.width):
            raise ValueError(f"target images are {tuple(images.shape[2:])}, the batch generates "
                             f"{(cond.height, cond.width)}")
        return self.pipe._pack_latents(self.encode_images(images)).float()

    def encode_references(self, references: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample, its reference images (3, h, w) in [-1, 1] -> (B, R, C) tokens and (B, R, 4) ids.

        All samples of a batch must have the same number of references with the same sizes (the data
        loader buckets by that); sizes must be multiples of 16 px.
        """
        check_references(references, self.scale)
        n_ref = len(references[0])
        flat = torch.stack([img for r in references for img in r])  # (B * M, 3, h, w); same size by the check
        latents = self.encode_images(flat)
        per_image = [lat[None] for lat in latents[:n_ref]]
        ids = self.pipe._prepare_image_ids(per_image).to(self.device)  # (1, R, 4): t = 10, 20, ...
        tokens = self.pipe._pack_latents(latents)  # (B * M, hw, C)
        tokens = tokens.reshape(len(references), n_ref * tokens.shape[1], tokens.shape[2])
        return tokens.to(self.transformer.dtype), ids.expand(len(references), -1, -1)

    def condition(self, prompts: Sequence[str], references: Sequence[Sequence[torch.Tensor]], *,
                  height: int, width: int) -> Conditioning:
        if len(prompts) != len(references):
            raise ValueError(f"{len(prompts)} prompts but {len(references)} reference lists")
        if height % self.scale or width % self.scale:
            raise ValueError(f"image size {height}x{width}: height and width must be multiples of {self.scale}")
        prompt, prompt_ids = self.encode_prompt(prompts)
        refs, ref_ids = self.encode_references(references) if references and len(references[0]) else (None, None)
        shape = (len(prompts), 1, height // self.scale, width // self.scale)
        latent_ids = self.pipe._prepare_latent_ids(torch.empty(shape, device="meta")).to(self.device)
        cond = Conditioning(prompt, prompt_ids, refs, ref_ids, latent_ids, height, width)
        if self.classifier_free:
            cond.extra["negative"] = self.encode_prompt([""] * len(prompts))
        return cond

    @property
    def classifier_free(self) -> bool:
        """Whether velocity() combines a conditional and an unconditional (empty prompt) branch."""
        return self.guidance_scale > 1.0

    def _guidance(self, batch: int, device: torch.device) -> torch.Tensor | None:
        """The transformer's `guidance=` input: none for klein (no guidance embedder)."""
        return None

    # ------------------------------------------------------------------ sampling

    def initial_latents(self, cond: Conditioning, generator: torch.Generator | None = None) -> torch.Tensor:
        channels = int(self.transformer.config.in_channels)
        n = cond.latent_ids.shape[1]
        noise = torch.randn((cond.batch_size, n, channels), generator=generator, device="cpu", dtype=torch.float32)
        return noise.to(self.device)

    def sigmas(self, num_steps: int, cond: Conditioning) -> torch.Tensor:
        """The klein pipeline's schedule: linspace(1, 1/T, T) shifted (by its empirical mu, or the scheduler's
        static shift: see `shift`), then 0."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        mu = compute_empirical_mu(image_seq_len=cond.latent_ids.shape[1], num_steps=num_steps)
        self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu, device="cpu")
        return self.scheduler.sigmas.to(torch.float32).clone()

    def shift(self, u: torch.Tensor, num_steps: int, cond: Conditioning) -> torch.Tensor:
        """Uniform times u in (0, 1) -> noise levels with the sampler's shift for this resolution and T
        (the base model's timestep shift, used to draw training times for L_diff). The scheduler's rule, as
        its `set_timesteps` applies it: klein's resolution-dependent mu (use_dynamic_shifting, the released
        models), else the scheduler's static `shift`."""
        u = u.clamp(1e-4, 1 - 1e-4)
        if not self.scheduler.config.use_dynamic_shifting:
            shift = float(self.scheduler.config.shift)
            return shift * u / (1 + (shift - 1) * u)
        mu = compute_empirical_mu(image_seq_len=cond.latent_ids.shape[1], num_steps=num_steps)
        return self.scheduler.time_shift(mu, 1.0, u)

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor | float, cond: Conditioning) -> torch.Tensor:
        n, b = latents.shape[1], latents.shape[0]
        t = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device).reshape(-1)
        t = t.expand(b) if t.numel() == 1 else t
        x, x_ids, refs, ref_ids = latents, cond.latent_ids, cond.references, cond.reference_ids
        prompt, prompt_ids = cond.prompt, cond.prompt_ids
        negative = cond.extra.get("negative")
        if negative is not None:  # both guidance branches in one forward
            x, x_ids, t = x.repeat(2, 1, 1), x_ids.repeat(2, 1, 1), t.repeat(2)
            if refs is not None:
                refs, ref_ids = refs.repeat(2, 1, 1), ref_ids.repeat(2, 1, 1)
            prompt, prompt_ids = torch.cat([prompt, negative[0]]), torch.cat([prompt_ids, negative[1]])
        dtype = self.transformer.dtype
        common = dict(timestep=t.to(dtype), guidance=self._guidance(x.shape[0], x.device),
                      encoder_hidden_states=prompt.to(dtype), txt_ids=prompt_ids, return_dict=False)
        if refs is None:
            out = self.denoiser(hidden_states=x.to(dtype), img_ids=x_ids, **common)[0]
        elif not self.kv:  # [image, references]; keep the image tokens
            out = self.denoiser(hidden_states=torch.cat([x, refs.to(x.dtype)], dim=1).to(dtype),
                                img_ids=torch.cat([x_ids, ref_ids], dim=1), **common)[0][:, :n]
        else:
            cacheable = self.reference_cache and not torch.is_grad_enabled()
            cache = cond.extra.get("kv_cache") if cacheable else None
            if cache is not None:
                out = self.denoiser(hidden_states=x.to(dtype), img_ids=x_ids, kv_cache=cache, kv_cache_mode="cached",
                                    **common)[0]
            else:  # [references, image]; the output holds the image tokens only
                out, cache = self.denoiser(hidden_states=torch.cat([refs.to(x.dtype), x], dim=1).to(dtype),
                                           img_ids=torch.cat([ref_ids, x_ids], dim=1), kv_cache_mode="extract",
                                           num_ref_tokens=refs.shape[1], **common)
                if cacheable:
                    cond.extra["kv_cache"] = cache
        out = out.to(latents.dtype)
        if negative is not None:
            cond_v, uncond_v = out[:b], out[b:]
            return uncond_v + self.guidance_scale * (cond_v - uncond_v)
        return out

    def decode(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Packed latents -> images (B, 3, H, W) clamped to [-1, 1]; differentiable (no torch.no_grad here)."""
        h, w = cond.height // self.scale, cond.width // self.scale
        x = latents.transpose(1, 2).reshape(latents.shape[0], latents.shape[2], h, w)  # ids are row-major
        mean, std = self._bn_stats(x)
        x = self.pipe._unpatchify_latents(x * std + mean)
        image = self.vae.decode(x.to(self.vae.dtype), return_dict=False)[0]
        return image.float().clamp(-1.0, 1.0)

    def _bn_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std


class Flux2DevGenerator(Flux2KleinGenerator):
    """`umo.models.base.Generator` for FLUX.2 [dev] (see the module docstring): klein's sampler with the Mistral
    Small 3.1 prompt and embedded guidance.

    pipe: a loaded Flux2Pipeline (its modules are used, its __call__ is not).
    text_layers: text-encoder hidden states stacked into the prompt embedding (the pipeline's 10, 20, 30).
    max_sequence_length: prompt tokens, system message included (padded / truncated), as the pipeline's argument.
    guidance_scale: the embedded guidance the transformer is given at every step (the pipeline's default 4);
    never a classifier-free batch.
    reference_cache: accepted for the common signature; [dev] has no KV variant, so nothing is cached.
    """

    family = "flux2_dev"
    pipelines = DEV_PIPELINES
    default_text_layers = DEV_TEXT_LAYERS
    expected_layout = DEV_LAYOUT

    def __init__(self, pipe, *, text_layers: Sequence[int] = DEV_TEXT_LAYERS, max_sequence_length: int = 512,
                 guidance_scale: float = 4.0, reference_cache: bool = True) -> None:
        super().__init__(pipe, text_layers=text_layers, max_sequence_length=max_sequence_length,
                         guidance_scale=guidance_scale, reference_cache=reference_cache)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, text_layers: Sequence[int] | None = None,
                        max_sequence_length: int = 512, guidance_scale: float = 4.0, reference_cache: bool = True,
                        dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "Flux2DevGenerator":
        """Load a local Flux2Pipeline folder. text_layers None: the folder's tiny marker if it has one
        (umo.toy.tiny.flux2_dev), else diffusers' default (10, 20, 30). Raises as `Flux2KleinGenerator`'s."""
        return super().from_pretrained(path, text_layers=text_layers, max_sequence_length=max_sequence_length,
                                       guidance_scale=guidance_scale, reference_cache=reference_cache, dtype=dtype,
                                       device=device)

    @classmethod
    def _load_pipeline(cls, pipeline_cls, path: Path, dtype: torch.dtype):
        if is_torchvision_available():  # transformers builds the PixtralProcessor itself
            return super()._load_pipeline(pipeline_cls, path, dtype)
        pipe = pipeline_cls.from_pretrained(path, local_files_only=True, use_safetensors=True, dtype=dtype,
                                            tokenizer=None)
        pipe.tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        return pipe

    def _prompt_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.pipe._get_mistral_3_small_prompt_embeds(
            self.text_encoder, self.tokenizer, list(prompts), dtype=self.transformer.dtype, device=self.device,
            max_sequence_length=self.max_sequence_length, system_message=self.pipe.system_message,
            hidden_states_layers=self.text_layers)

    @property
    def classifier_free(self) -> bool:
        return False

    def _guidance(self, batch: int, device: torch.device) -> torch.Tensor:
        """The guidance scale per sample, float32 as the pipeline passes it (the transformer embeds it)."""
        return torch.full((batch,), self.guidance_scale, dtype=torch.float32, device=device)
