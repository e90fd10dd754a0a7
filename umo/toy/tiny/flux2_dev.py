"""Tiny, seeded FLUX.2 [dev] components: the real diffusers/transformers classes at toy sizes.

For tests: `write_tiny_flux2_dev(dir)` saves a complete `Flux2Pipeline` folder (model_index.json, transformer/,
vae/, text_encoder/, tokenizer/, scheduler/) as the released FLUX.2-dev checkpoint is laid out, plus
umo_tiny.json saying it is a tiny test model, so the generator loads it through the same code path
(`from_pretrained`, local files only) as real weights. Nothing is downloaded.

The text encoder is a `Mistral3ForConditionalGeneration` (a Mistral language model with a Pixtral vision tower),
and the pipeline's `tokenizer` component a `PixtralProcessor`: tokenizer/ holds the tokenizer (a byte-level BPE
built in memory: no merges, every byte a token, plus Mistral's control tokens at their real ids, [IMG] = 10 and
<pad> = 11 among them), its chat template (Mistral's layout reduced to what the pipeline renders: the system
message in [SYSTEM_PROMPT] ... [/SYSTEM_PROMPT], each user turn in [INST] ... [/INST], [IMG] for an image),
the Pixtral image processor's preprocessor_config.json and the processor's processor_config.json. transformers
builds a PixtralProcessor only with torchvision installed (its image processor module imports it), so the
pipeline is saved with the bare tokenizer and the processor's two files are added by hand, in the layout
transformers reads a PixtralProcessor from (the image processor's settings, from its PIL variant, and the
processor's own); model_index.json names `PixtralProcessor` as the released folder does. umo.models.flux2 says how
such a folder is read without torchvision.

Sizes (defaults): transformer 2 double + 2 single blocks, 2 heads x 16, with the guidance embedder (FLUX.2 [dev] is
guidance-distilled); VAE 4 levels (8x downsampling as the real one), 8 latent channels -> 32 packed channels;
text encoder 3 Mistral layers of width 32 (the generator stacks hidden states of layers 1, 2, 3 instead of 10, 20,
30), vision tower 1 Pixtral layer of width 32.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import Flux2Pipeline
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PixtralImageProcessorPil,
    PreTrainedTokenizerFast,
)

from umo.io import atomic_dir
from umo.models.flux2 import TINY_MARKER
from umo.toy.tiny.flux2 import TINY_TEXT_LAYERS, TinyFlux2Config, image_parts


# Mistral Small 3.1's control tokens, in the order of their ids 0.. (its tokenizer's first entries)
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                  "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                  "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")
IMAGE_TOKEN = "[IMG]"
# What `format_input` of diffusers' Flux2Pipeline produces: a system message, then user turns, each message's
# content a list of {"type": "text", "text": ...} (or {"type": "image"}) parts.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% else %}[IMG]{% endif %}{% endfor %}[/INST]"
    "{% elif message['role'] == 'assistant' %}"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)
PATCH_SIZE = 14  # the vision tower's patch side, as Pixtral in Mistral Small 3.1
SPATIAL_MERGE = 2
PROCESSOR_CONFIG = {"processor_class": "PixtralProcessor", "patch_size": PATCH_SIZE,
                    "spatial_merge_size": SPATIAL_MERGE, "image_token": IMAGE_TOKEN,
                    "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}


@dataclass(frozen=True)
class TinyFlux2DevConfig(TinyFlux2Config):
    """Sizes of the tiny components (see the module docstring): [klein]'s, plus the vision tower's."""

    vision_hidden: int = 32
    vision_layers: int = 1


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizers-backed tokenizer over Mistral's control tokens plus the 256 byte-level symbols, built in memory,
    with the chat template (see the module docstring)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *alphabet])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>", model_max_length=1024,
                                        chat_template=CHAT_TEMPLATE)
    tokenizer.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)  # whole tokens in text, never split into bytes
    return tokenizer


def tiny_image_processor() -> PixtralImageProcessorPil:
    """Pixtral's image processor (its PIL variant: the same settings, no torchvision) for images of at most 112 px."""
    return PixtralImageProcessorPil(size={"longest_edge": 8 * PATCH_SIZE}, patch_size=PATCH_SIZE)


def tiny_components(config: TinyFlux2DevConfig = TinyFlux2DevConfig()) -> dict:
    """Seeded tiny transformer, VAE, text encoder, tokenizer and scheduler (the [dev] pipeline's modules; the
    tokenizer here is the processor's tokenizer, see `write_tiny_flux2_dev`)."""
    tokenizer = tiny_tokenizer()
    c = config
    torch.manual_seed(c.seed)
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=c.hidden,
                         intermediate_size=2 * c.hidden, num_hidden_layers=c.text_layers, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, max_position_embeddings=1024, sliding_window=None),
        vision_config=dict(model_type="pixtral", hidden_size=c.vision_hidden, intermediate_size=2 * c.vision_hidden,
                           num_hidden_layers=c.vision_layers, num_attention_heads=2, head_dim=16,
                           image_size=8 * PATCH_SIZE, patch_size=PATCH_SIZE),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), spatial_merge_size=SPATIAL_MERGE,
    )).eval()
    return {"text_encoder": text_encoder, "tokenizer": tokenizer, **image_parts(c, guidance_embeds=True)}


def write_tiny_flux2_dev(out_dir: str | Path, config: TinyFlux2DevConfig = TinyFlux2DevConfig()) -> Path:
    """Save a tiny Flux2Pipeline folder (safetensors weights) to out_dir; returns out_dir.
    Written to a temporary sibling and renamed, so a reader never sees half a model."""
    out_dir = Path(out_dir)
    pipe = Flux2Pipeline(**tiny_components(config))
    marker = {**asdict(config), "text_layers_used": list(TINY_TEXT_LAYERS),
              "note": "tiny random weights for tests; not a real model"}
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)  # tokenizer/: the tokenizer files and chat template
        # the rest of the PixtralProcessor, by hand (see the module docstring)
        folder = tmp / "tokenizer"
        tiny_image_processor().to_json_file(folder / "preprocessor_config.json")
        (folder / "processor_config.json").write_text(json.dumps(PROCESSOR_CONFIG, indent=2, sort_keys=True) + "\n")
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
        tokenizer_config["processor_class"] = "PixtralProcessor"
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")
        index = json.loads((tmp / "model_index.json").read_text())
        index["tokenizer"] = ["transformers", "PixtralProcessor"]  # the released folder's entry
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / TINY_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    return out_dir
