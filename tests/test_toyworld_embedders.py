"""Toy-world embedders: the ArcFace training loop, the saved formats and the verification metrics."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from umo.faces.embed import OnnxRecognizer, iresnet, load_arcface
from umo.toy.config import ToyEmbedderConfig
from umo.toy.onnx_export import export_recognizer_onnx
from umo.toy.world.embedders import (
    ArcFaceHead,
    aligned_faces,
    build_embedders,
    embed,
    save_reward,
    tar_at_far,
    train_embedder,
    verification_metrics,
)


@pytest.fixture(scope="module")
def faces():
    torch.set_num_threads(1)
    return aligned_faces(0, range(4), 4, seed=0)


def tiny(arch: str = "toy_r10", seed: int = 0) -> ToyEmbedderConfig:
    return ToyEmbedderConfig(arch=arch, num_features=32, epochs=1, batch=16, lr=3e-3, seed=seed)


def test_aligned_faces_shapes_and_determinism(faces):
    crops, labels = faces
    assert crops.shape == (16, 112, 112, 3) and crops.dtype == np.uint8
    assert labels.tolist() == [i for i in range(4) for _ in range(4)]
    again, _ = aligned_faces(0, range(4), 4, seed=0)
    assert np.array_equal(crops, again)
    assert len({c.tobytes() for c in crops}) == 16  # every sample is a different rendering


def test_toy_archs_are_arcface_torch_state_dicts():
    small, real = iresnet("toy_r10", num_features=32), iresnet("r18")
    assert set(small.state_dict()) <= set(real.state_dict())
    assert small(torch.zeros(2, 3, 112, 112)).shape == (2, 32)
    assert iresnet("toy_r18")(torch.zeros(2, 3, 112, 112)).shape == (2, 512)


def test_arcface_head_adds_the_margin_to_the_target_only():
    head = ArcFaceHead(2, 3, s=10.0, m=0.5)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    theta = 0.3
    emb = torch.tensor([[math.cos(theta), math.sin(theta)]])
    logits = head(emb * 5.0, torch.tensor([0]))  # scale-free: embeddings are normalized
    expected = [10 * math.cos(theta + 0.5), 10 * math.sin(theta), -10 * math.cos(theta)]
    assert torch.allclose(logits[0], torch.tensor(expected), atol=1e-5)
    # beyond pi - m the target logit falls back to cos - m sin m (arcface_torch), not cos(theta + m)
    far = head(torch.tensor([[-1.0, 0.0]]), torch.tensor([0]))
    assert far[0, 0].item() == pytest.approx(10 * (-1.0 - math.sin(math.pi - 0.5) * 0.5), abs=1e-4)


def test_training_lowers_the_loss_and_moves_every_parameter(faces):
    crops, labels = faces
    cfg = tiny()
    torch.manual_seed(cfg.seed)
    before = {k: v.clone() for k, v in iresnet(cfg.arch, num_features=cfg.num_features).named_parameters()}
    model, losses = train_embedder(crops, labels, dataclasses.replace(cfg, epochs=8))
    assert len(losses) == 8 and losses[-1] < losses[0]
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{name} did not change"
    assert not model.training


def test_short_training_is_deterministic(faces):
    crops, labels = faces
    a, la = train_embedder(crops, labels, tiny(seed=3), max_steps=2)
    b, lb = train_embedder(crops, labels, tiny(seed=3), max_steps=2)
    c, _ = train_embedder(crops, labels, tiny(seed=4), max_steps=2)
    assert la == lb
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["fc.weight"], sc["fc.weight"])


def test_saved_files_load_through_the_real_loaders(tmp_path, faces):
    crops, labels = faces
    model, _ = train_embedder(crops, labels, tiny(), max_steps=1)
    want = embed(model, crops)

    path = save_reward(model, tmp_path / "arcface_toy_r10.safetensors")
    reward = load_arcface(path, "toy_r10")
    with torch.no_grad():
        got = reward(torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1.0).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match=r"looks like toy_r10.*not toy_r18"):
        load_arcface(path, "toy_r18")
    with pytest.raises(ValueError, match=r"widths \[16, 32, 64, 128\].*not r18"):
        load_arcface(path, "r18")

    judge = OnnxRecognizer(export_recognizer_onnx(model, tmp_path / "judge_toy_r10.onnx"))
    np.testing.assert_allclose(judge.embed_aligned(crops), want, atol=1e-4)


def test_verification_metrics_on_hand_made_embeddings():
    # 50 identities with two faces each, every face on its own axes: impostor cosines are exactly 0 and
    # identity k's genuine cosine is c_k. 40 identities at +0.5, 10 at -0.5.
    n, c = 50, np.array([0.5] * 40 + [-0.5] * 10)
    emb = np.zeros((2 * n, 2 * n))
    for k in range(n):
        emb[2 * k, 2 * k] = 1.0
        emb[2 * k + 1, 2 * k] = c[k]
        emb[2 * k + 1, 2 * k + 1] = math.sqrt(1 - c[k] ** 2)
    labels = np.repeat(np.arange(n), 2)
    m = verification_metrics(emb, labels, emb_b=emb[:, ::-1] * 3.0)
    assert (m["n_genuine"], m["n_impostor"]) == (50, 4900)
    # FAR 1e-3 of 4900 impostors: threshold 0 (the 5th highest impostor); genuine strictly above: 40/50
    assert m["tar@far1e-3"] == pytest.approx(0.8)
    assert math.isnan(m["tar@far1e-4"])  # fewer than 10,000 impostors
    # at t = 0 nothing false-accepted, 10/50 false-rejected: the closest point of the two curves
    assert m["eer"] == pytest.approx(0.1)
    assert m["b_tar@far1e-3"] == pytest.approx(0.8) and m["score_corr"] == pytest.approx(1.0)


def test_tar_at_far_by_hand():
    genuine = np.array([0.9, 0.8, 0.5, 0.3])
    impostor = np.array([0.1, 0.2, 0.7, 0.6, 0.0, 0.4, 0.3, 0.35])
    # far 0.25 of 8 impostors = 2 accepted (0.7, 0.6): threshold 0.4, genuine above: 0.9, 0.8, 0.5
    assert tar_at_far(genuine, impostor, 0.25) == pytest.approx(0.75)
    assert math.isnan(tar_at_far(genuine, impostor, 0.1))


def test_build_embedders_writes_both_files_and_measures_them(tmp_path):
    cfg = dict(num_features=16, epochs=1, batch=8)
    reward_path, judge_path = tmp_path / "arcface_toy_r10.safetensors", tmp_path / "judge" / "judge_toy_r10.onnx"
    res = build_embedders(0, reward=ToyEmbedderConfig(arch="toy_r10", seed=1, **cfg), reward_path=reward_path,
                          judge=ToyEmbedderConfig(arch="toy_r10", seed=2, **cfg), judge_path=judge_path,
                          train_ids=range(3), test_ids=range(3, 5), per_id=2, per_test_id=2,
                          metadata={"umo.world": "toy"})
    assert -1.0 <= res["score_corr"] < 1.0  # two seeds: two different models
    assert (res["n_genuine"], res["n_impostor"]) == (2, 4)
    load_arcface(reward_path, "toy_r10")
    OnnxRecognizer(judge_path)
