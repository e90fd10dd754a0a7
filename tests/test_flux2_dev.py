"""FLUX.2 [dev] (tiny, real diffusers classes): our sampler against Flux2Pipeline.__call__, the family's loading,
and its LoRA file read back by diffusers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import Flux2Pipeline
from PIL import Image
from safetensors import safe_open

from umo.config import GeneratorConfig, LoraConfig
from umo.images import to_signed
from umo.models import load_generator, sample
from umo.models.flux2 import TINY_MARKER, Flux2DevGenerator, Flux2KleinGenerator
from umo.models.lora import add_lora, lora_parameters, save_lora
from umo.toy.tiny.flux2_dev import TINY_TEXT_LAYERS, TinyFlux2DevConfig, write_tiny_flux2_dev

PROMPT = "two people at a table"
HEIGHT, WIDTH = 64, 96  # generated: 4 x 6 tokens
REFERENCE = (64, 80)  # (h, w): multiples of 16, at least 64 px a side and under 1024^2 px, so the pipeline's
# preprocessing (a crop to multiples of 16 at the same size) leaves the pixels as they are


@pytest.fixture(scope="module")
def dev_dir(tmp_path_factory):
    return write_tiny_flux2_dev(tmp_path_factory.mktemp("generator") / "tiny_flux2_dev")


def references(n: int, seed: int = 0) -> list[np.ndarray]:
    """n random (h, w, 3) uint8 images of REFERENCE's size."""
    rs = np.random.RandomState(seed)
    return [rs.randint(0, 255, (*REFERENCE, 3), np.uint8) for _ in range(n)]


def signed(pixels: np.ndarray) -> torch.Tensor:
    return to_signed(torch.from_numpy(pixels).permute(2, 0, 1))


def dev(path, **kw) -> Flux2DevGenerator:
    kw.setdefault("max_sequence_length", 512)  # the pipeline's own default, which these tests compare with
    return load_generator(GeneratorConfig(path=str(path), family="flux2_dev", **kw))


def test_tiny_folder_is_a_real_dev_pipeline_marked_tiny(dev_dir):
    index = json.loads((dev_dir / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2Pipeline"
    assert index["tokenizer"] == ["transformers", "PixtralProcessor"]
    assert index["text_encoder"] == ["transformers", "Mistral3ForConditionalGeneration"]
    assert json.loads((dev_dir / TINY_MARKER).read_text())["text_layers_used"] == list(TINY_TEXT_LAYERS)
    assert {p.name for p in (dev_dir / "tokenizer").iterdir()} >= {
        "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
        "processor_config.json"}
    transformer = json.loads((dev_dir / "transformer" / "config.json").read_text())
    c = TinyFlux2DevConfig()
    assert transformer["guidance_embeds"] is True and transformer["in_channels"] == 4 * c.latent_channels
    assert transformer["joint_attention_dim"] == len(TINY_TEXT_LAYERS) * c.hidden
    gen = dev(dev_dir)
    assert type(gen) is Flux2DevGenerator and gen.family == "flux2_dev"
    assert gen.text_layers == TINY_TEXT_LAYERS and not gen.kv and not gen.reference_cache


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_sampler_reproduces_the_diffusers_pipeline(dev_dir, guidance):
    """Our condition / initial latents / sigmas / velocity / Euler / decode == Flux2Pipeline.__call__, two
    references, the guidance embedded."""
    gen = dev(dev_dir, guidance_scale=guidance)
    refs = references(2)
    cond = gen.condition([PROMPT], [[signed(r) for r in refs]], height=HEIGHT, width=WIDTH)
    assert "negative" not in cond.extra  # guidance-distilled: no classifier-free branch
    x1 = gen.initial_latents(cond, torch.Generator().manual_seed(0))
    ours = sample(gen, cond, 3, latents=x1)
    ours_images = (gen.decode(ours, cond) / 2 + 0.5).clamp(0, 1)
    # the pipeline takes the noise unpacked, (B, C, h, w), and packs it row-major as we do
    kw = dict(prompt=PROMPT, image=[Image.fromarray(r) for r in refs], height=HEIGHT, width=WIDTH,
              num_inference_steps=3, latents=x1.transpose(1, 2).reshape(1, -1, HEIGHT // 16, WIDTH // 16),
              guidance_scale=guidance, text_encoder_out_layers=gen.text_layers, max_sequence_length=512)
    theirs = gen.pipe(**kw, output_type="latent").images
    theirs_images = gen.pipe(**kw, output_type="pt").images
    latent_diff = (ours - theirs).abs().max().item()
    image_diff = (ours_images - theirs_images).abs().max().item()
    print(f"guidance {guidance}: max |latent diff| {latent_diff:.3g} (scale {ours.abs().max().item():.3g}), "
          f"max |image diff| {image_diff:.3g}")
    assert ours.shape == theirs.shape == (1, 24, 32) and ours_images.shape == theirs_images.shape == (1, 3, 64, 96)
    assert latent_diff <= 1e-5 and image_diff <= 1e-5


def test_guidance_is_embedded_in_one_forward(dev_dir):
    """Each step is one transformer call on the batch as it is, given guidance= the scale; the scale changes the
    velocity (the guidance embedder is in use)."""
    seen = []

    def spy(module, args, kwargs):
        seen.append((kwargs["hidden_states"].shape[0], kwargs["guidance"]))

    velocities = {}
    for scale in (1.0, 4.0):
        gen = dev(dev_dir, guidance_scale=scale)
        cond = gen.condition([PROMPT, "a dog"], [[signed(r)] for r in references(2)], height=HEIGHT, width=WIDTH)
        x = gen.initial_latents(cond, torch.Generator().manual_seed(0))
        handle = gen.transformer.register_forward_pre_hook(spy, with_kwargs=True)
        with torch.no_grad():
            velocities[scale] = gen.velocity(x, 0.5, cond)
        handle.remove()
    assert [batch for batch, _ in seen] == [2, 2]
    for (_, guidance), scale in zip(seen, (1.0, 4.0)):
        assert guidance.dtype == torch.float32 and guidance.tolist() == [scale, scale]
    assert (velocities[4.0] - velocities[1.0]).abs().max() > 1e-4


def test_the_folders_family_decides_the_generator(dev_dir, tiny_generator_dir):
    for family in ("flux2_dev", "auto"):
        gen = load_generator(GeneratorConfig(path=str(dev_dir), family=family))
        assert type(gen) is Flux2DevGenerator
    with pytest.raises(ValueError, match="holds a flux2_dev model, but generator.family is 'flux2_klein'"):
        load_generator(GeneratorConfig(path=str(dev_dir), family="flux2_klein"))
    # the classes themselves refuse the other family's folder
    with pytest.raises(ValueError, match="names 'Flux2KleinPipeline'; the flux2_dev family reads Flux2Pipeline"):
        Flux2DevGenerator.from_pretrained(tiny_generator_dir)
    with pytest.raises(ValueError, match="names 'Flux2Pipeline'; the flux2_klein family reads"):
        Flux2KleinGenerator.from_pretrained(dev_dir)


def test_diffusers_load_lora_weights_reproduces_our_velocity(dev_dir, tmp_path):
    gen = dev(dev_dir)
    cond = gen.condition([PROMPT], [[signed(r) for r in references(2)]], height=HEIGHT, width=WIDTH)
    x = gen.initial_latents(cond, torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = gen.velocity(x, 0.5, cond)
    lora = LoraConfig(rank=4, alpha=8.0)  # scale 2, a power of two: folding it into B is exact
    targets = add_lora(gen.transformer, rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules, seed=0)
    with torch.no_grad():
        for name, p in gen.transformer.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        tuned = gen.velocity(x, 0.5, cond)
    assert lora_parameters(gen.transformer) and (tuned - base).abs().max() > 1e-3

    path = save_lora(gen.transformer, tmp_path / "lora", pipeline_cls=Flux2Pipeline)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 2 * len(targets) and all(k.startswith("transformer.") and ".lora_" in k for k in keys)

    # a fresh pipeline, loaded by diffusers alone; without its tokenizer component (a PixtralProcessor, which needs
    # torchvision), which the velocity never reads
    pipe = Flux2Pipeline.from_pretrained(dev_dir, local_files_only=True, use_safetensors=True, tokenizer=None)
    pipe.load_lora_weights(tmp_path / "lora")
    other = Flux2DevGenerator(pipe, text_layers=gen.text_layers, guidance_scale=gen.guidance_scale)
    with torch.no_grad():
        theirs = other.velocity(x, 0.5, cond)
    print(f"diffusers load_lora_weights vs ours: max |delta v| = {(theirs - tuned).abs().max().item():.3g}")
    assert torch.equal(theirs, tuned)
