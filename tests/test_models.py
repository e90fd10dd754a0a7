"""The generator protocol on FLUX.2 [klein] (tiny, real diffusers classes) and its LoRA in the diffusers format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image
from safetensors import safe_open

from umo.config import GeneratorConfig, LoraConfig
from umo.models import load_generator, sample
from umo.models.flux2 import Flux2KleinGenerator
from umo.models.lora import LORA_FILE, add_lora, lora_parameters, save_lora
from umo.toy.tiny.flux2 import TINY_MARKER

LORA = LoraConfig(rank=4, alpha=8.0)


def images(n: int, size: int = 64, seed: int = 0) -> list[Image.Image]:
    rs = np.random.RandomState(seed)
    return [Image.fromarray(rs.randint(0, 255, (size, size, 3), np.uint8)) for _ in range(n)]


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1


def generator(path, **kw) -> Flux2KleinGenerator:
    kw.setdefault("max_sequence_length", 512)  # the pipeline's own default, which these tests compare with
    return load_generator(GeneratorConfig(path=str(path), **kw))


def test_tiny_folder_is_a_real_klein_pipeline_marked_tiny(tiny_generator_dir):
    index = json.loads((tiny_generator_dir / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline"
    assert json.loads((tiny_generator_dir / TINY_MARKER).read_text())["text_layers_used"] == [1, 2, 3]
    assert sorted(p.name for p in tiny_generator_dir.glob("*/*.safetensors")) == [
        "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors", "model.safetensors"]
    assert generator(tiny_generator_dir).text_layers == (1, 2, 3)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_sampler_reproduces_the_diffusers_pipeline(tiny_generator_dir, guidance):
    """Our condition / initial latents / sigmas / velocity / Euler / decode == Flux2KleinPipeline.__call__."""
    gen = generator(tiny_generator_dir, guidance_scale=guidance)
    refs = images(2)
    cond = gen.condition(["two people at a table"], [[to_tensor(i) for i in refs]], height=64, width=96)
    x1 = gen.initial_latents(cond, torch.Generator().manual_seed(0))
    ours = (gen.decode(sample(gen, cond, 4, latents=x1), cond) / 2 + 0.5).clamp(0, 1)
    theirs = gen.pipe(prompt="two people at a table", image=refs, height=64, width=96, num_inference_steps=4,
                      latents=x1.transpose(1, 2).reshape(1, -1, 4, 6), text_encoder_out_layers=gen.text_layers,
                      guidance_scale=guidance, output_type="pt").images
    assert ours.shape == theirs.shape == (1, 3, 64, 96)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_sigmas_run_from_one_to_zero(tiny_generator_dir):
    gen = generator(tiny_generator_dir)
    cond = gen.condition(["a"], [[]], height=64, width=64)
    sig = gen.sigmas(8, cond)
    assert sig.shape == (9,) and sig[0] == pytest.approx(1.0) and sig[-1] == 0.0
    assert bool((sig[1:] < sig[:-1]).all())


@pytest.mark.parametrize("static_shift", [None, 2.0])
def test_training_times_follow_the_samplers_shift(tiny_generator_dir, static_shift):
    """L_diff's noise levels are the sampler's: shift(u) at the sampler's grid u = 1, ..., 1/T is its sigmas,
    for klein's resolution-dependent shift and for a scheduler with a static one (the toy base's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    gen = generator(tiny_generator_dir)
    if static_shift is not None:
        gen.scheduler = FlowMatchEulerDiscreteScheduler(shift=static_shift, use_dynamic_shifting=False)
    cond = gen.condition(["a"], [[]], height=64, width=64)
    grid = torch.linspace(1.0, 1 / 8, 8)
    torch.testing.assert_close(gen.shift(grid.clamp(max=1 - 1e-4), 8, cond), gen.sigmas(8, cond)[:-1],
                               atol=2e-4, rtol=0)
    if static_shift is not None:  # by hand: 2u / (1 + u) at u = 1/8
        assert float(gen.sigmas(8, cond)[-2]) == pytest.approx(2 * 0.125 / 1.125, abs=1e-6)


def test_batches_keep_samples_apart(tiny_generator_dir):
    """A sample's velocity does not depend on the other samples of its batch (references included)."""
    gen = generator(tiny_generator_dir)
    a, b = images(2, seed=1), images(2, seed=2)
    cond = gen.condition(["one", "two"], [[to_tensor(i) for i in a], [to_tensor(i) for i in b]], height=64, width=64)
    alone = gen.condition(["two"], [[to_tensor(i) for i in b]], height=64, width=64)
    x = gen.initial_latents(cond, torch.Generator().manual_seed(3))
    with torch.no_grad():
        both = gen.velocity(x, 0.7, cond)
        single = gen.velocity(x[1:], 0.7, alone)
    torch.testing.assert_close(both[1:], single, atol=1e-5, rtol=0)
    assert not torch.allclose(both[0], both[1])


def test_bad_inputs_are_named(tiny_generator_dir, tmp_path):
    gen = generator(tiny_generator_dir)
    one, two = [to_tensor(i) for i in images(1)], [to_tensor(i) for i in images(2)]
    with pytest.raises(ValueError, match="same number and sizes of references"):
        gen.condition(["a", "b"], [one, two], height=64, width=64)
    with pytest.raises(ValueError, match="multiples of 16"):
        gen.condition(["a"], [one], height=60, width=64)
    with pytest.raises(ValueError, match=r"reference image: expected \(3, h, w\)"):
        gen.condition(["a"], [[torch.zeros(3, 40, 64)]], height=64, width=64)
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}: no model_index.json .*never downloaded"):
        generator(tmp_path)
    with pytest.raises(ValueError, match="only 3 layers"):
        generator(tiny_generator_dir, text_layers=[9, 18, 27])


def test_lora_starts_at_the_base_model_and_diffusers_reads_our_file(tiny_generator_dir, tmp_path):
    gen = generator(tiny_generator_dir)
    cond = gen.condition(["a"], [[to_tensor(i) for i in images(1)]], height=64, width=64)
    x = gen.initial_latents(cond, torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = gen.velocity(x, 0.5, cond)
    targets = add_lora(gen.transformer, rank=LORA.rank, alpha=LORA.alpha, target_modules=LORA.target_modules, seed=0)
    assert len(targets) == 2 * 8 + 2 * 2  # 2 double blocks x 8 projections, 2 single blocks x 2
    params = lora_parameters(gen.transformer)
    assert params and all(p.requires_grad for p in params)
    assert all("lora_" in n for n, p in gen.transformer.named_parameters() if p.requires_grad)
    with torch.no_grad():
        torch.testing.assert_close(gen.velocity(x, 0.5, cond), base)  # B = 0: exactly the base model
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
        tuned = gen.velocity(x, 0.5, cond)
    assert (tuned - base).abs().max() > 1e-3

    path = save_lora(gen.transformer, tmp_path / "lora")
    assert path.name == LORA_FILE and not list((tmp_path).glob("*.tmp"))
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)  # LoRA only
        assert json.loads(f.metadata()["lora_adapter_metadata"])["transformer.r"] == 4

    # the same weights give the same bytes (registration keys on the sha256): diffusers' two metadata entries come
    # out in a per-call random order unless the header is rewritten canonically
    again = {save_lora(gen.transformer, tmp_path / f"again-{k}").read_bytes() for k in range(6)}
    assert again == {path.read_bytes()}

    pipe = Flux2KleinPipeline.from_pretrained(tiny_generator_dir, local_files_only=True)
    pipe.load_lora_weights(tmp_path / "lora")
    other = Flux2KleinGenerator(pipe, text_layers=gen.text_layers)
    with torch.no_grad():
        torch.testing.assert_close(other.velocity(x, 0.5, cond), tuned, atol=1e-6, rtol=0)


def test_decode_is_differentiable_to_the_latents(tiny_generator_dir):
    gen = generator(tiny_generator_dir)
    cond = gen.condition(["a"], [[]], height=64, width=64)
    x = gen.initial_latents(cond, torch.Generator().manual_seed(0)).requires_grad_(True)
    img = gen.decode(x, cond)
    assert img.shape == (1, 3, 64, 64) and img.min() >= -1 and img.max() <= 1
    img.mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def tiny_kv_dir(tmp_path_factory):
    from umo.toy.tiny.flux2 import write_tiny_flux2

    return write_tiny_flux2(tmp_path_factory.mktemp("kv") / "tiny_flux2_kv", kv=True)


def test_kv_variant_reproduces_its_pipeline_and_the_reference_cache_is_exact(tiny_kv_dir):
    """The KV folder loads as Flux2KleinKVPipeline; our sampler with the reference cache == its __call__ (which
    caches too) == our sampler recomputing the references at every step."""
    from diffusers import Flux2KleinKVPipeline

    gen = generator(tiny_kv_dir)
    assert isinstance(gen.pipe, Flux2KleinKVPipeline) and gen.kv and gen.reference_cache
    refs = images(3)
    cond = gen.condition(["three people"], [[to_tensor(i) for i in refs]], height=64, width=64)
    x1 = gen.initial_latents(cond, torch.Generator().manual_seed(0))
    with torch.no_grad():
        cached = sample(gen, cond, 4, latents=x1)
    assert "kv_cache" in cond.extra
    theirs = gen.pipe(prompt="three people", image=refs, height=64, width=64, num_inference_steps=4,
                      latents=x1.transpose(1, 2).reshape(1, -1, 4, 4), text_encoder_out_layers=gen.text_layers,
                      output_type="pt").images
    torch.testing.assert_close((gen.decode(cached, cond) / 2 + 0.5).clamp(0, 1), theirs, atol=1e-5, rtol=0)

    full = generator(tiny_kv_dir, reference_cache=False)
    cond_full = full.condition(["three people"], [[to_tensor(i) for i in refs]], height=64, width=64)
    with torch.no_grad():
        recomputed = sample(full, cond_full, 4, latents=x1)
    assert "kv_cache" not in cond_full.extra
    torch.testing.assert_close(cached, recomputed, atol=1e-5, rtol=0)
    # with gradient, the full forward runs (no stale cache), so the references carry gradient too
    x = x1.clone().requires_grad_(True)
    v = gen.velocity(x, 0.5, cond)
    with torch.no_grad():
        torch.testing.assert_close(v, full.velocity(x1, 0.5, cond_full), atol=1e-5, rtol=0)
    v.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_a_foreign_pipeline_folder_is_named(tiny_generator_dir, tmp_path):
    import shutil

    folder = shutil.copytree(tiny_generator_dir, tmp_path / "other")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="names 'FluxPipeline'; the flux2_klein family reads"):
        Flux2KleinGenerator.from_pretrained(folder)
    with pytest.raises(ValueError, match="names 'FluxPipeline', which umo cannot fine-tune; supported: flux2_klein"):
        generator(folder)


def test_settings_that_contradict_what_the_generator_was_trained_with_are_refused(tiny_generator_dir, tmp_path):
    import shutil

    from umo.models import TRAINED_WITH

    folder = shutil.copytree(tiny_generator_dir, tmp_path / "trained")
    (folder / TRAINED_WITH).write_text(json.dumps({"resolution": [64, 64], "reference_resolution": [32, 32],
                                                   "max_sequence_length": 4}))
    kw = {"resolution": [64, 64], "reference_resolution": [32, 32], "max_sequence_length": 4}
    assert generator(folder, **kw).max_sequence_length == 4  # as trained: loads
    with pytest.raises(ValueError, match=r"umo_trained_with.json: generator.reference_resolution is \[48, 48\], "
                                         r"trained with \[32, 32\]; generator.max_sequence_length is 512"):
        generator(folder, **kw | {"reference_resolution": [48, 48], "max_sequence_length": 512})
    (folder / TRAINED_WITH).write_text("{not json")
    with pytest.raises(ValueError, match="umo_trained_with.json: not valid JSON"):
        generator(folder, **kw)


def test_a_file_that_is_not_safetensors_is_named_when_made_canonical(tmp_path):
    from umo.io import canonical_safetensors

    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(ValueError, match=r"w.safetensors: not a safetensors file \(header is not JSON"):
        canonical_safetensors(bad)
    bad.write_bytes(b"abc")
    with pytest.raises(ValueError, match=r"w.safetensors: not a safetensors file \(3 bytes\)"):
        canonical_safetensors(bad)


def test_a_component_with_pickled_weights_only_is_named(tiny_generator_dir, tmp_path):
    """Weights load from safetensors only (use_safetensors=True): a component saved with safe_serialization=False
    is an error naming the folder and the component, and saying to convert it, before diffusers reads anything."""
    import shutil

    from diffusers import AutoencoderKLFlux2

    folder = shutil.copytree(tiny_generator_dir, tmp_path / "pickled")
    vae = AutoencoderKLFlux2.from_pretrained(folder / "vae", use_safetensors=True)
    shutil.rmtree(folder / "vae")
    vae.save_pretrained(folder / "vae", safe_serialization=False)
    assert sorted(p.name for p in (folder / "vae").iterdir()) == ["config.json", "diffusion_pytorch_model.bin"]
    with pytest.raises(ValueError, match=rf"generator folder {folder}: component vae/ holds only pickled weights "
                                         r"\(diffusion_pytorch_model.bin\); .* convert it"):
        generator(folder)
