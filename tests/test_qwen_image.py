"""Qwen-Image-Edit-Plus (2509 and 2511) as a generator family, on tiny local folders in the real layout.

Our sampler against `QwenImageEditPlusPipeline.__call__` (with and without true CFG), LoRA files that diffusers'
`load_lora_weights` reads back, the family read from the folder, and the chain's parts on it: a ReReFL step whose
reward rises, the training loop, the evaluation and the registry.
"""

from __future__ import annotations

import json

import diffusers
import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus
import numpy as np
import pytest
import torch
from evalkit import EVAL, fixed_judges
from mlflow import MlflowClient
from PIL import Image
from test_eval_run import evaluate_with
from test_rerefl import batch_of_two, improve
from trainkit import fixed_reward, make_manifest, train_config, train_with

from umo.config import GeneratorConfig, LoraConfig, load_config
from umo.images import to_signed
from umo.models import load_generator, sample
from umo.models.lora import add_lora, lora_parameters, save_lora
from umo.models.qwen_image import QwenImageEditGenerator
from umo.package import serve_settings
from umo.registry import FAMILY_TAG, RegistryError, register, version_files
from umo.toy.tiny.qwen_image import TinyQwenImageConfig, write_tiny_qwen_image_edit

CONDITION_AREA = 56 * 56  # what the tiny text encoder sees of each reference (the pipeline: 384 x 384)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    return {"2509": write_tiny_qwen_image_edit(root / "edit-2509"),
            "2511": write_tiny_qwen_image_edit(root / "edit-2511", TinyQwenImageConfig(zero_cond_t=True))}


def references(n: int = 2, size: int = 32) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(rng.random((size, size, 3)) * 255).astype(np.uint8) for _ in range(n)]


def signed(rgb: np.ndarray) -> torch.Tensor:
    return to_signed(torch.from_numpy(rgb).permute(2, 0, 1))


@pytest.mark.parametrize(("variant", "guidance"), [("2509", 1.0), ("2509", 4.0), ("2511", 1.0)])
def test_our_sampler_gives_the_pipelines_latents_and_images(folders, monkeypatch, variant, guidance):
    gen = QwenImageEditGenerator.from_pretrained(folders[variant], guidance_scale=guidance,
                                                 condition_area=CONDITION_AREA)
    refs = references()
    cond = gen.condition(["two people at a table"], [[signed(r) for r in refs]], height=32, width=48)
    assert cond.references.shape == (1, 2 * 4, 16) and cond.extra["img_shapes"] == [[(1, 2, 3), (1, 2, 2), (1, 2, 2)]]
    noise = gen.initial_latents(cond, torch.Generator().manual_seed(0))
    ours = sample(gen, cond, 3, latents=noise.clone())
    image = gen.decode(ours, cond)

    # the pipeline resizes references to VAE_IMAGE_SIZE and CONDITION_IMAGE_SIZE pixels: here, to what we use
    monkeypatch.setattr(edit_plus, "VAE_IMAGE_SIZE", 32 * 32)
    monkeypatch.setattr(edit_plus, "CONDITION_IMAGE_SIZE", CONDITION_AREA)
    call = dict(image=[Image.fromarray(r) for r in refs], prompt="two people at a table", height=32, width=48,
                num_inference_steps=3, latents=noise.clone())
    if guidance > 1:
        call |= {"true_cfg_scale": guidance, "negative_prompt": " "}
    theirs = gen.pipe(**call, output_type="latent").images
    pixels = gen.pipe(**call, output_type="pt").images * 2 - 1
    assert (theirs - ours).abs().max() < 1e-5 and ours.abs().max() > 0.5
    assert (pixels - image).abs().max() < 1e-5


def test_a_lora_file_loads_into_the_pipeline_and_gives_our_velocity(folders, tmp_path):
    gen = QwenImageEditGenerator.from_pretrained(folders["2509"], condition_area=CONDITION_AREA)
    targets = add_lora(gen.transformer, rank=4, alpha=8.0, target_modules=LoraConfig().target_modules, seed=0)
    assert any(t.endswith("attn.add_q_proj") for t in targets) and any(t.endswith("attn.to_out.0") for t in targets)
    with torch.no_grad():
        for p in lora_parameters(gen.transformer):
            p.add_(0.2 * torch.randn_like(p))
    path = save_lora(gen.transformer, tmp_path / "lora", pipeline_cls=type(gen.pipe))
    cond = gen.condition(["a portrait"], [[signed(r) for r in references(1)]], height=32, width=32)
    x = gen.initial_latents(cond, torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = gen.velocity(x, 0.7, cond)

    fresh = QwenImageEditGenerator.from_pretrained(folders["2509"], condition_area=CONDITION_AREA)
    with torch.no_grad():
        plain = fresh.velocity(x, 0.7, cond)
    fresh.pipe.load_lora_weights(path.parent, weight_name=path.name, adapter_name="umo")
    with torch.no_grad():
        theirs = fresh.velocity(x, 0.7, cond)
    assert (theirs - ours).abs().max() < 1e-6 < (plain - ours).abs().max()


def test_the_family_is_read_from_the_folder_and_an_unsupported_one_is_named(folders, tmp_path):
    gen = load_generator(GeneratorConfig(family="auto", path=str(folders["2509"])))
    assert isinstance(gen, QwenImageEditGenerator) and gen.family == "qwen_image_edit"
    with pytest.raises(ValueError, match="holds a qwen_image_edit model, but generator.family is 'flux2_klein'"):
        load_generator(GeneratorConfig(family="flux2_klein", path=str(folders["2509"])))
    other = tmp_path / "sd"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match=r"'StableDiffusionPipeline', which umo cannot fine-tune; supported: "
                                         r"flux2_klein .*flux2_dev \(Flux2Pipeline\); qwen_image_edit"):
        load_generator(GeneratorConfig(family="auto", path=str(other)))


def test_rerefl_on_a_fixed_batch_raises_the_reward_and_moves_every_lora_parameter(folders, toy_world):
    torch.manual_seed(0)
    gen = QwenImageEditGenerator.from_pretrained(folders["2509"], condition_area=CONDITION_AREA)
    targets = add_lora(gen.transformer, rank=4, alpha=4.0, target_modules=LoraConfig().target_modules, seed=0,
                       exclude=gen.dead_modules)
    assert "transformer_blocks.1.attn.add_q_proj" not in targets and "transformer_blocks.1.attn.add_k_proj" in targets
    improve(gen, *batch_of_two(toy_world))  # the klein test's batch and steps, on this family


def test_train_evaluate_and_register_a_qwen_lora(folders, toy_world, mlflow_server, tmp_path):
    """The chain's own code on this family: the training loop, the evaluation (fixed faces on the generated
    images), and registration, whose model name and card carry the family, and which keeps families apart."""
    manifest = make_manifest(tmp_path / "data", toy_world, n_samples=2)
    settings = ["generator.family=auto", "train.max_steps=2", "train.sample_every=0",
                f"tracking.tracking_uri={mlflow_server}", "registry.model_name=umo-qwen-image-edit-lora",
                f"eval.path={manifest}", *EVAL, "eval.images_per_item=1"]
    config = train_config(toy_world, folders["2509"], *settings)
    before = {n: p.detach().clone() for n, p in
              _fresh_lora(config).named_parameters() if p.requires_grad}
    result = train_with(config, manifest=manifest, out=tmp_path / "train", reward_model=fixed_reward(toy_world))
    trained = {n: p for n, p in result.transformer.named_parameters() if p.requires_grad}
    assert set(trained) == set(before) and all(not torch.equal(trained[n], before[n]) for n in before)

    report = evaluate_with(config, lora=result.lora.parent, judges=fixed_judges(config), out=tmp_path / "report")
    assert report.metrics["candidate"]["images_scored"] == 2 and report.metrics["candidate"]["faces_scored"] == 4

    done = register(config.registry, config.tracking, serving=serve_settings(config), lora=config.lora,
                    train_dir=tmp_path / "train", report=tmp_path / "report")
    client = MlflowClient(mlflow_server)
    assert client.get_registered_model(done.name).tags[FAMILY_TAG] == "qwen_image_edit"
    assert client.get_model_version(done.name, done.version).tags[FAMILY_TAG] == "qwen_image_edit"
    card = version_files(client, done.name, done.version, tmp_path / "files")["model_card"].read_text()
    assert "- qwen_image_edit" in card and "umo-qwen-image-edit-lora" in card

    klein = load_config(None, [*toy_world.faces_overrides(), f"generator.path={folders['2509']}", *settings,
                               "registry.model_name=umo-flux2-klein-lora"])
    with pytest.raises(RegistryError, match="'umo-flux2-klein-lora' is for flux2_klein LoRAs, this one was trained "
                                            "on qwen_image_edit: set registry.model_name, e.g. umo-qwen-image-edit"):
        register(klein.registry, klein.tracking, serving=serve_settings(klein), lora=klein.lora,
                 train_dir=tmp_path / "train", report=tmp_path / "report")


def _fresh_lora(config) -> torch.nn.Module:
    """The transformer with the adapter the training loop starts from (same seed, same targets)."""
    gen = load_generator(config.generator)
    add_lora(gen.transformer, rank=config.lora.rank, alpha=config.lora.alpha,
             target_modules=config.lora.target_modules, seed=config.seed, exclude=gen.dead_modules)
    return gen.transformer


def test_diffusers_reads_its_own_pipeline_class_from_the_folder(folders):
    """The folder names the released classes: QwenImageEditPlusPipeline with a Qwen2VLProcessor."""
    index = json.loads((folders["2511"] / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPlusPipeline" == type(load_generator(
        GeneratorConfig(family="qwen_image_edit", path=str(folders["2511"]))).pipe).__name__
    assert index["processor"] == ["transformers", "Qwen2VLProcessor"]
    assert diffusers.QwenImageTransformer2DModel.load_config(folders["2511"] / "transformer")["zero_cond_t"] is True
