"""Tiny, seeded Qwen-Image-Edit-Plus components: the real diffusers/transformers classes at toy sizes.

`write_tiny_qwen_image_edit(dir)` saves a complete `QwenImageEditPlusPipeline` folder (model_index.json,
transformer/, vae/, text_encoder/, tokenizer/, processor/, scheduler/) in the layout of Qwen-Image-Edit-2509 and
-2511, plus umo_tiny.json saying it is a tiny test model, so the generator loads it through the same code path
(`from_pretrained`, local files only) as real weights. Nothing is downloaded: the tokenizer is a byte-level BPE
built in memory (no merges; every byte is a token) with Qwen2.5-VL's special tokens, and the processor wraps it
with Qwen2-VL's image processor.

Sizes: transformer 2 blocks of 2 heads x 16 (the real one: 60 blocks of 24 x 128); VAE base width 8 with 4 latent
channels (the real one: 96 and 16), still 8x downsampling; text encoder 2 Qwen2.5-VL layers of width 32 with a
vision tower of 2 blocks of width 32 (the real one: Qwen2.5-VL-7B). `zero_cond_t` makes the 2511 variant, whose
reference tokens are modulated at time 0.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPlusPipeline,
    QwenImageTransformer2DModel,
)
from tokenizers import pre_tokenizers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLImageProcessor

from umo.io import atomic_dir
from umo.models.flux2 import TINY_MARKER
from umo.models.qwen_image import ImageTextProcessor

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
# Qwen-Image's released scheduler settings (scheduler/scheduler_config.json of Qwen/Qwen-Image-Edit-2509)
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
                 shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)


@dataclass(frozen=True)
class TinyQwenImageConfig:
    """Sizes of the tiny components (see the module docstring)."""

    hidden: int = 32  # text encoder width (= the transformer's joint_attention_dim)
    text_layers: int = 2
    vision_depth: int = 2
    heads: int = 2
    head_dim: int = 16
    blocks: int = 2
    latent_channels: int = 4
    vae_base: int = 8
    zero_cond_t: bool = False  # Qwen-Image-Edit-2511
    seed: int = 0


def tiny_tokenizer() -> Qwen2Tokenizer:
    """A Qwen2Tokenizer over the 256 byte-level symbols plus Qwen2.5-VL's special tokens, built in memory."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *alphabet])}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=1024)
    tokenizer.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)  # whole tokens in text, never split into bytes
    return tokenizer


def tiny_components(config: TinyQwenImageConfig = TinyQwenImageConfig()) -> dict:
    """Seeded tiny transformer, VAE, text encoder, tokenizer, processor and scheduler (the pipeline's modules)."""
    c = config
    tokenizer = tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    # images of at most 64 x 64 px in the vision tower (the pipeline resizes references to its condition area)
    processor = ImageTextProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=64 * 64),
                                   tokenizer=tokenizer, video_processor=None)
    torch.manual_seed(c.seed)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=c.hidden, intermediate_size=2 * c.hidden,
                         num_hidden_layers=c.text_layers, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=4096, bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                         # heads of width 16: 8 rotary pairs, split over (time, height, width) as M-RoPE does
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=c.vision_depth, hidden_size=c.hidden, intermediate_size=2 * c.hidden, num_heads=2,
                           out_hidden_size=c.hidden, fullatt_block_indexes=[c.vision_depth - 1], window_size=56),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )).eval()
    torch.manual_seed(c.seed + 1)
    z = c.latent_channels
    vae = AutoencoderKLQwenImage(base_dim=c.vae_base, z_dim=z, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                 latents_mean=[0.1 * i for i in range(z)],
                                 latents_std=[1.0 + 0.25 * i for i in range(z)]).eval()
    torch.manual_seed(c.seed + 2)
    third = c.head_dim // 4
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * z, out_channels=z, num_layers=c.blocks, attention_head_dim=c.head_dim,
        num_attention_heads=c.heads, joint_attention_dim=c.hidden, zero_cond_t=c.zero_cond_t,
        axes_dims_rope=(c.head_dim - 2 * third, third, third)).eval()
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "processor": processor, "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER)}


def write_tiny_qwen_image_edit(out_dir: str | Path,
                               config: TinyQwenImageConfig = TinyQwenImageConfig()) -> Path:
    """Save a tiny QwenImageEditPlusPipeline folder (safetensors weights) to out_dir; returns out_dir.
    Written to a temporary sibling and renamed, so a reader never sees half a model."""
    out_dir = Path(out_dir)
    parts = tiny_components(config)
    processor = parts.pop("processor")
    marker = {**asdict(config), "note": "tiny random weights for tests; not a real model"}
    with atomic_dir(out_dir) as tmp:
        # the processor is saved by hand: transformers saves a Qwen2VLProcessor only with its video processor
        QwenImageEditPlusPipeline(**parts, processor=None).save_pretrained(tmp, safe_serialization=True)
        processor.tokenizer.save_pretrained(tmp / "processor")
        processor.image_processor.save_pretrained(tmp / "processor")
        video = processor.image_processor.to_dict() | {"video_processor_type": "Qwen2VLVideoProcessor"}
        video.pop("image_processor_type", None)
        (tmp / "processor" / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2) + "\n")
        index = json.loads((tmp / "model_index.json").read_text())
        index["processor"] = ["transformers", "Qwen2VLProcessor"]  # the released folders' entry
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / TINY_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    return out_dir
