"""Tiny, seeded FLUX.2 [klein] components: the real diffusers/transformers classes at toy sizes.

For tests and the embedded default: `write_tiny_flux2(dir)` saves a complete `Flux2KleinPipeline` folder
(model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/) exactly as a real checkpoint
is laid out, plus umo_tiny.json saying it is a tiny test model, so the generator loads it through the same code path (`from_pretrained`, local files only) as
real weights. Nothing is downloaded: the tokenizer is a byte-level BPE built in memory (no merges; every
byte is a token) with a Qwen-style chat template.

Sizes (defaults): transformer 2 double + 2 single blocks, 2 heads x 16, hidden 32; VAE 2 levels (8x
downsampling as the real one: 3 halvings), 8 latent channels -> 32 packed channels; text encoder 3 Qwen3
layers of width 32 (the generator stacks hidden states of layers 1, 2, 3 instead of 9, 18, 27).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinKVPipeline,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
)
from tokenizers import pre_tokenizers
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM

from umo.io import atomic_dir
from umo.models.flux2 import TINY_MARKER

TINY_TEXT_LAYERS = (1, 2, 3)  # hidden-state indices stacked as the prompt embedding (real klein: 9, 18, 27)

# Qwen3's chat template reduced to what the klein pipeline uses: one user turn, the generation prompt and
# an empty thinking block when enable_thinking is false.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


@dataclass(frozen=True)
class TinyFlux2Config:
    """Sizes of the tiny components (see the module docstring)."""

    hidden: int = 32  # text encoder width
    text_layers: int = 3
    heads: int = 2
    head_dim: int = 16
    double_blocks: int = 2
    single_blocks: int = 2
    latent_channels: int = 8
    vae_channels: tuple[int, ...] = (16, 32, 32, 32)  # 4 levels = 3 halvings = 8x, like the real VAE
    seed: int = 0


def tiny_tokenizer():
    """A Qwen2Tokenizer over the 256 byte-level symbols plus Qwen's special tokens, built in memory."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *alphabet])}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=512)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_components(config: TinyFlux2Config = TinyFlux2Config()) -> dict:
    """Seeded tiny transformer, VAE, text encoder, tokenizer and scheduler (the klein pipeline's modules)."""
    tokenizer = tiny_tokenizer()
    c = config
    torch.manual_seed(c.seed)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=c.hidden, intermediate_size=2 * c.hidden,
        num_hidden_layers=c.text_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=1024, tie_word_embeddings=True,
    )).eval()
    return {"text_encoder": text_encoder, "tokenizer": tokenizer, **image_parts(c, guidance_embeds=False)}


def image_parts(c, *, guidance_embeds: bool) -> dict:
    """The seeded tiny VAE, transformer and scheduler of a FLUX.2 folder ([klein] and [dev] alike; c: a config
    with the sizes of TinyFlux2Config). guidance_embeds: the guidance-distilled [dev] transformer."""
    torch.manual_seed(c.seed + 1)
    n_levels = len(c.vae_channels)
    vae = AutoencoderKLFlux2(
        block_out_channels=c.vae_channels, down_block_types=("DownEncoderBlock2D",) * n_levels,
        up_block_types=("UpDecoderBlock2D",) * n_levels, layers_per_block=1, latent_channels=c.latent_channels,
        norm_num_groups=8, sample_size=64,
    ).eval()
    torch.manual_seed(c.seed + 2)
    axes = (c.head_dim // 4,) * 4
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * c.latent_channels, num_layers=c.double_blocks,
        num_single_layers=c.single_blocks, attention_head_dim=c.head_dim, num_attention_heads=c.heads,
        joint_attention_dim=len(TINY_TEXT_LAYERS) * c.hidden, timestep_guidance_channels=32,
        axes_dims_rope=axes, guidance_embeds=guidance_embeds,
    ).eval()
    return {"transformer": transformer, "vae": vae,
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)}


def write_tiny_flux2(out_dir: str | Path, config: TinyFlux2Config = TinyFlux2Config(), *, kv: bool = False) -> Path:
    """Save a tiny Flux2KleinPipeline folder (safetensors weights) to out_dir; returns out_dir.

    kv: save it as a Flux2KleinKVPipeline instead (same modules; reference tokens first, cacheable).
    Written to a temporary sibling and renamed, so a reader never sees half a model.
    """
    out_dir = Path(out_dir)
    pipe = (Flux2KleinKVPipeline if kv else Flux2KleinPipeline)(**tiny_components(config), is_distilled=False)
    marker = {**asdict(config), "text_layers_used": list(TINY_TEXT_LAYERS),
              "note": "tiny random weights for tests and the embedded default; not a real model"}
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / TINY_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    return out_dir
