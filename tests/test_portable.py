"""Portable artifacts: a LoRA file that diffusers, ComfyUI-style loaders and our own readers all take to the same
weights when alpha != rank, and a model card whose front matter the Hugging Face Hub reads."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import Flux2KleinPipeline
from huggingface_hub import ModelCard
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from umo.card import model_card
from umo.config import GeneratorConfig, LoraConfig
from umo.models import load_generator
from umo.models.flux2 import Flux2KleinGenerator
from umo.models.lora import (LORA_FILE, add_lora, attach_lora_file, load_lora, lora_parameters, lora_state_dict,
                             save_lora)

RANK = 4
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "attn.to_qkv_mlp_proj", "attn.to_out"]


def comfyui_weights(path, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's reading of a LoRA (comfy/lora.py `load_lora`, comfy/weight_adapter/lora.py), from the raw keys:
    for each prefix x with x.lora_A.weight and x.lora_B.weight, W + (alpha / rank) B A in float32, where alpha
    is x.alpha's value and the scale is 1 when the file has no x.alpha. The header (diffusers' metadata) is never
    read. base: the transformer's weights by name; returns {module: effective weight}."""
    raw = load_file(str(path))
    out = {}
    for key in raw:
        if key.endswith(".lora_B.weight"):
            x = key.removesuffix(".lora_B.weight")
            up, down = raw[key].float(), raw[f"{x}.lora_A.weight"].float()
            scale = raw[f"{x}.alpha"].item() / down.shape[0] if f"{x}.alpha" in raw else 1.0
            module = x.removeprefix("transformer.")
            out[module] = base[f"{module}.weight"] + scale * (up @ down)
    return out


def peft_weights(model) -> dict[str, torch.Tensor]:
    """{module: base weight + the active adapter's (alpha / rank) B A}, as peft computes the layer."""
    return {name: m.base_layer.weight + m.get_delta_weight(m.active_adapters[0])
            for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def max_delta(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b) and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module", params=[8.0, 6.0], ids=["alpha8", "alpha6"])
def trained(request, tiny_generator_dir, tmp_path_factory):
    """A tiny generator with a rank-4 LoRA moved off its init, alpha 8 (scale 2, a power of two) or 6 (1.5): the
    generator, a conditioning, latents, its velocity, and the folder of its LoRA file."""
    gen = load_generator(GeneratorConfig(path=str(tiny_generator_dir), max_sequence_length=512))
    add_lora(gen.transformer, rank=RANK, alpha=request.param, target_modules=TARGETS, seed=0)
    with torch.no_grad():
        for p in lora_parameters(gen.transformer):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    cond = gen.condition(["a"], [[torch.zeros(3, 32, 32)]], height=64, width=64)
    x = gen.initial_latents(cond, torch.Generator().manual_seed(0))
    with torch.no_grad():
        velocity = gen.velocity(x, 0.5, cond)
    out = tmp_path_factory.mktemp("lora")
    save_lora(gen.transformer, out / "lora")
    return gen, cond, x, velocity, out


def exact(gen) -> bool:
    """Whether the LoRA's scale alpha / rank is a power of two, which folds into B and out again exactly."""
    return gen.transformer.peft_config["default"].lora_alpha == 2 * RANK


def fresh(tiny_generator_dir) -> Flux2KleinGenerator:
    return load_generator(GeneratorConfig(path=str(tiny_generator_dir), max_sequence_length=512))


def test_the_file_carries_its_scale_in_b_and_says_alpha_is_rank(trained):
    gen, *_, out = trained
    path = out / "lora" / LORA_FILE
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys) and len(keys) == 2 * 20
    assert meta["transformer.r"] == RANK and meta["transformer.lora_alpha"] == RANK
    assert save_lora(gen.transformer, out / "again").read_bytes() == path.read_bytes()  # deterministic


def test_a_comfyui_style_reader_gets_the_trained_weights(trained, tiny_generator_dir):
    gen, *_, out = trained
    base = load_file(str(tiny_generator_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    with torch.no_grad():
        ours = peft_weights(gen.transformer)
        delta = max_delta(comfyui_weights(out / "lora" / LORA_FILE, base), ours)
        print(f"ComfyUI-style reader vs peft, alpha {gen.transformer.peft_config['default'].lora_alpha}: "
              f"max |delta W| = {delta:.3g}")
        assert delta == 0 if exact(gen) else delta <= 1e-6
        # the earlier file (alpha in the header only): such a reader scales by 1, not alpha / rank
        save_lora(gen.transformer, out / "unfolded", fold=False)
        assert max_delta(comfyui_weights(out / "unfolded" / LORA_FILE, base), ours) > 1e-3


def test_diffusers_load_lora_weights_reproduces_our_velocity(trained, tiny_generator_dir):
    gen, cond, x, velocity, out = trained
    pipe = Flux2KleinPipeline.from_pretrained(tiny_generator_dir, local_files_only=True, use_safetensors=True)
    pipe.load_lora_weights(out / "lora")
    other = Flux2KleinGenerator(pipe, text_layers=gen.text_layers)
    with torch.no_grad():
        delta = (other.velocity(x, 0.5, cond) - velocity).abs().max().item()
    print(f"diffusers load_lora_weights vs ours, alpha {gen.transformer.peft_config['default'].lora_alpha}: "
          f"max |delta v| = {delta:.3g}")
    assert delta == 0 if exact(gen) else delta <= 1e-6
    # why the scale is folded, not written as `<module>.alpha` tensors: diffusers' FLUX.2 loader refuses them
    raw = load_file(str(out / "lora" / LORA_FILE))
    with_alpha = raw | {k.replace(".lora_A.weight", ".alpha"): torch.tensor(float(RANK))
                        for k in raw if k.endswith(".lora_A.weight")}
    save_file(with_alpha, str(out / "with_alpha.safetensors"))
    with pytest.raises(ValueError, match="Invalid adapter checkpoint"):
        Flux2KleinPipeline.load_lora_weights(pipe, out, weight_name="with_alpha.safetensors", adapter_name="a")


def test_our_readers_take_folded_and_earlier_files(trained, tiny_generator_dir):
    gen, cond, x, velocity, out = trained
    alpha = gen.transformer.peft_config["default"].lora_alpha
    if not (out / "unfolded").exists():
        save_lora(gen.transformer, out / "unfolded", fold=False)
    other = fresh(tiny_generator_dir)
    attach_lora_file(other.transformer, out / "lora", "folded")
    attach_lora_file(other.transformer, out / "unfolded", "earlier")
    with torch.no_grad():
        other.transformer.set_adapter("earlier")
        assert torch.equal(other.velocity(x, 0.5, cond), velocity)
        other.transformer.set_adapter("folded")
        torch.testing.assert_close(other.velocity(x, 0.5, cond), velocity, atol=1e-6, rtol=0)
    # the training resume's reader: the adapter as trained (rank 4, alpha 8 or 6) from the folded file
    again = fresh(tiny_generator_dir)
    add_lora(again.transformer, rank=RANK, alpha=alpha, target_modules=TARGETS, seed=1)
    load_lora(again.transformer, out / "lora")
    trained_state, loaded = lora_state_dict(gen.transformer), lora_state_dict(again.transformer)
    if exact(gen):
        assert all(torch.equal(loaded[k], v) for k, v in trained_state.items())
    else:  # within one float32 rounding of B
        for k, v in trained_state.items():
            torch.testing.assert_close(loaded[k], v, atol=0, rtol=2.5e-7)


# ------------------------------------------------------------------------------------------------ the model card

METRICS = {"benchmark": "heldout", "toy_world": True, "images_per_item": 4,
           "base": {"id_sim": 22.661, "id_conf": 58.24, "id_match": 20.5043, "face_count_accuracy": 0.8514,
                    "unscored": 0, "faces_scored": 548, "references_scored": 592},
           "candidate": {"id_sim": 25.8104, "id_conf": 57.5802, "id_match": 23.7537, "face_count_accuracy": 0.8953,
                         "unscored": 0, "faces_scored": 559, "references_scored": 592},
           "delta": {"id_sim": 3.1494, "id_conf": -0.6598, "id_match": 3.2494, "face_count_accuracy": 0.0439,
                     "unscored": 0, "faces_scored": 11, "references_scored": 0}}
LINEAGE = {"base_model": "flux2_klein:artifacts/toybase/generator@0123456789ab", "git_commit": "a6f121a",
           "dvc.data_md5": "d41d8cd98f00b204e9800998ecf8427e", "dvc.params_md5": "0cc175b9c0f1b6a831c399e269772661",
           "umo.lora_sha256": "db0d5110" * 8}


def test_the_model_card_round_trips_through_huggingface_hub(tmp_path):
    card = model_card("umo-flux2-klein-lora", base_model="black-forest-labs/FLUX.2-klein-4B", family="flux2_klein",
                      lora=LoraConfig(rank=RANK, alpha=6.0), metrics=METRICS, lineage=LINEAGE)
    (tmp_path / "MODEL_CARD.md").write_text(str(card))
    data = ModelCard.load(tmp_path / "MODEL_CARD.md").data
    assert data.base_model == "black-forest-labs/FLUX.2-klein-4B" and data.library_name == "diffusers"
    assert data.license == "other" and data.model_name == "umo-flux2-klein-lora"
    assert {"lora", "diffusers", "umo", "text-to-image", "image-to-image", "flux2_klein", "toy-world"} <= set(data.tags)
    assert {r.metric_type: r.metric_value for r in data.eval_results} == {
        "id_sim": 25.8104, "id_conf": 57.5802, "id_match": 23.7537, "face_count_accuracy": 0.8953}
    assert {r.dataset_type for r in data.eval_results} == {"heldout"}
    text = str(card)
    assert "| ID-Sim | 22.66 | 25.81 | +3.149 |" in text and "| ID-Conf | 58.24 | 57.58 | -0.6598 |" in text
    assert "| Faces found (judge) | 548 | 559 | +11 |" in text
    for line in ("> **Toy world.**", "rank 4, alpha 6", LINEAGE["umo.lora_sha256"], "git commit `a6f121a`",
                 LINEAGE["dvc.data_md5"], LINEAGE["base_model"], "## Use and limits"):
        assert line in text, line
    real = model_card("m", base_model="b", family="flux2_klein", lora=LoraConfig(), lineage=LINEAGE,
                      metrics=METRICS | {"toy_world": False}, license="apache-2.0")
    assert "toy-world" not in real.data.tags and "Toy world" not in str(real) and real.data.license == "apache-2.0"
