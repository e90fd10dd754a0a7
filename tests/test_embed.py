"""Embedders: IResNet checkpoints through load_arcface (all formats), the frozen embedder's contract, and the
ONNX judge loaded through insightface's own router."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from umo.faces.embed import (
    ArcFaceEmbedder,
    IResNet,
    OnnxRecognizer,
    iresnet,
    load_arcface,
)
from umo.faces.types import Detections
from umo.toy.onnx_export import export_recognizer_onnx


class NotATensor:
    """Any custom class: weights_only unpickling must refuse it."""

    def __init__(self) -> None:
        self.payload = 1


def get_dummy_backbone(num_features: int = 512) -> IResNet:
    torch.manual_seed(0)
    model = iresnet("r18", num_features=num_features)
    # Non-trivial BN statistics, so that eval mode (running stats) and train mode (batch stats) differ.
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def backbone() -> IResNet:
    return get_dummy_backbone()


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(3, 3, 112, 112) * 2 - 1


@pytest.fixture(scope="module")
def reference(backbone, faces) -> torch.Tensor:
    """The backbone's own embeddings, through the same wrapper (same memory format: bit-exact comparisons)."""
    with torch.no_grad():
        return ArcFaceEmbedder(copy.deepcopy(backbone))(faces)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, backbone):
    d = tmp_path_factory.mktemp("ckpt")
    sd = backbone.state_dict()
    torch.save(sd, d / "backbone.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "backbone.safetensors"))
    # DDP-wrapped and nested like a training checkpoint, with some non-tensor metadata next to it.
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, d / "ddp.pt")
    return d


@pytest.mark.parametrize("name", ["backbone.pth", "backbone.safetensors", "ddp.pt"])
def test_load_formats_give_identical_outputs(ckpt_dir, faces, reference, name):
    emb = load_arcface(ckpt_dir / name, "r18")
    assert isinstance(emb, ArcFaceEmbedder) and not emb.training
    assert emb.num_features == 512
    assert all(not p.requires_grad for p in emb.parameters())
    with torch.no_grad():
        out = emb(faces)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)


def test_num_features_inferred_from_fc(tmp_path):
    model = get_dummy_backbone(num_features=128)
    torch.save(model.state_dict(), tmp_path / "b.pth")
    emb = load_arcface(tmp_path / "b.pth", "r18")
    assert emb.num_features == 128
    assert emb(torch.zeros(2, 3, 112, 112)).shape == (2, 128)


def test_missing_num_batches_tracked_is_tolerated(tmp_path, backbone, faces, reference):
    sd = {k: v for k, v in backbone.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pth")
    with torch.no_grad():
        out = load_arcface(tmp_path / "old.pth", "r18")(faces)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)


def test_pickled_objects_are_refused(tmp_path, backbone):
    torch.save({"state_dict": backbone.state_dict(), "extra": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="only plain tensors"):
        load_arcface(tmp_path / "evil.pth", "r18")


def test_wrong_arch_names_what_it_looks_like(ckpt_dir):
    with pytest.raises(ValueError, match=r"looks like r18.*not r50"):
        load_arcface(ckpt_dir / "backbone.pth", "r50")
    with pytest.raises(ValueError, match=r"unknown IResNet arch 'r42'.*r18"):
        load_arcface(ckpt_dir / "backbone.pth", "r42")
    with pytest.raises(ValueError, match="r18"):
        iresnet("r200")


def test_missing_and_unexpected_keys_and_shapes(tmp_path, backbone):
    sd = dict(backbone.state_dict())
    del sd["layer2.0.bn1.weight"]
    sd["head.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "keys.pth")
    with pytest.raises(ValueError, match=r"keys.pth.*layer2\.0\.bn1\.weight.*head\.weight"):
        load_arcface(tmp_path / "keys.pth", "r18")
    sd = dict(backbone.state_dict())
    sd["prelu.weight"] = torch.zeros(32)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"shape.pth.*prelu\.weight"):
        load_arcface(tmp_path / "shape.pth", "r18")


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_arcface(tmp_path / "nope.pth", "r50")
    (tmp_path / "w.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"w.ckpt.*\.safetensors"):
        load_arcface(tmp_path / "w.ckpt", "r50")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_arcface(tmp_path / "junk.pth", "r50")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="state dict"):
        load_arcface(tmp_path / "list.pth", "r50")


def test_embedder_contract(backbone, faces):
    emb = ArcFaceEmbedder(get_dummy_backbone())
    x = faces.clone().requires_grad_(True)
    out = emb(x)
    assert out.shape == (3, 512)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    out[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in emb.parameters())
    assert emb(torch.zeros(0, 3, 112, 112)).shape == (0, 512)
    with pytest.raises(ValueError, match=r"\(K, 3, 112, 112\)"):
        emb(torch.zeros(2, 112, 112, 3))


def test_train_mode_never_updates_bn(faces):
    emb = ArcFaceEmbedder(get_dummy_backbone())
    before = {k: v.clone() for k, v in emb.state_dict().items()}
    assert emb.train() is emb and not emb.training
    assert not any(m.training for m in emb.modules())
    with torch.no_grad():
        emb(faces)
    for k, v in emb.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("arch,expected", [("r50", 43.6e6), ("r100", 65.2e6)])
def test_param_counts(arch, expected):
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = iresnet(arch)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - expected) / expected < 0.01, n


# --------------------------------------------------------------------------------------------------
# The ONNX judge
# --------------------------------------------------------------------------------------------------


class TinyRecognizer(nn.Module):
    """(N, 3, 112, 112) RGB in [-1, 1] -> (N, 32); not channel-symmetric, so an RGB/BGR mix-up shows."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, kernel_size=16, stride=16)
        self.fc = nn.Linear(16, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyRecognizer().eval()
    path = export_recognizer_onnx(model, tmp_path_factory.mktemp("pack") / "buffalo_t" / "w600k_r50.onnx")
    return model, path


def torch_embed(model: nn.Module, crops_rgb_uint8: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(crops_rgb_uint8.transpose(0, 3, 1, 2).astype(np.float32))
    with torch.no_grad():
        return torch.nn.functional.normalize(model((x / 255 - 0.5) / 0.5), dim=1).numpy()


def test_judge_matches_torch_and_insightface(tiny_judge):
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    model, path = tiny_judge
    judge = OnnxRecognizer(path)
    assert isinstance(judge.model, ArcFaceONNX) and judge.image_size == 112
    crops = np.random.default_rng(0).integers(0, 256, (4, 112, 112, 3)).astype(np.uint8)
    emb = judge.embed_aligned(crops)
    assert emb.shape == (4, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(emb, torch_embed(model, crops), atol=1e-4)
    # insightface's own path (BGR in, swapped to RGB by get_feat) gives the same vectors
    feat = judge.model.get_feat([c[:, :, ::-1].copy() for c in crops])
    np.testing.assert_allclose(emb, feat / np.linalg.norm(feat, axis=1, keepdims=True), atol=1e-5)
    # and a BGR mix-up would have shown
    assert np.abs(judge.embed_aligned(crops[..., ::-1]) - emb).max() > 1e-3
    assert judge.embed_aligned(np.zeros((0, 112, 112, 3), np.uint8)).shape == (0, 32)


def test_judge_embed_aligns_like_norm_crop(tiny_judge):
    from insightface.utils.face_align import norm_crop

    model, path = tiny_judge
    judge = OnnxRecognizer(path)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (200, 240, 3)).astype(np.uint8) for _ in range(3)]
    lmk0 = np.array([[[80, 90], [120, 88], [100, 110], [85, 130], [118, 129]]], np.float32)
    # three faces; the middle one has coincident landmarks
    lmk2 = np.concatenate([lmk0 + 40, np.zeros((1, 5, 2), np.float32), lmk0 - 30])
    dets = [
        Detections(np.zeros((1, 4), np.float32), lmk0, np.ones(1, np.float32)),
        Detections.empty(),
        Detections(np.zeros((3, 4), np.float32), lmk2, np.ones(3, np.float32)),
    ]
    out = judge.embed(images, dets)
    assert [o.shape for o in out] == [(1, 32), (0, 32), (3, 32)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref0 = torch_embed(model, np.stack([norm_crop(images[0], lmk0[0])]))
        ref2 = torch_embed(model, np.stack([norm_crop(images[2], lmk2[i]) for i in (0, 2)]))
    np.testing.assert_allclose(out[0], ref0, atol=1e-4)
    np.testing.assert_allclose(out[2][[0, 2]], ref2, atol=1e-4)
    assert (out[2][1] == 0).all()  # degenerate face: zero row, rows stay aligned with detections


def test_judge_refuses_non_recognizer(tmp_path):
    path = tmp_path / "rect.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TinyRecognizer(), (torch.zeros(1, 3, 112, 128),), str(path), dynamo=False)
    with pytest.raises(ValueError, match=r"rect.onnx.*recognizer"):
        OnnxRecognizer(path)


def test_from_model_root(tiny_judge, tmp_path):
    _, path = tiny_judge
    pack_dir = path.parent
    assert OnnxRecognizer.from_model_root(pack_dir).model_file == path
    assert OnnxRecognizer.from_model_root(pack_dir.parent, "buffalo_t").model_file == path
    # insightface's own layout: <root>/models/<pack>
    (tmp_path / "models" / "mypack").mkdir(parents=True)
    renamed = tmp_path / "models" / "mypack" / "my_recognizer.onnx"
    renamed.write_bytes(path.read_bytes())
    assert OnnxRecognizer.from_model_root(tmp_path, "mypack").model_file == renamed  # found by its shape
    with pytest.raises(FileNotFoundError, match=r"absent.*w600k_r50.onnx"):
        OnnxRecognizer.from_model_root(tmp_path, "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*w600k_r50.onnx"):
        OnnxRecognizer.from_model_root(tmp_path / "empty")


def test_judge_input_errors(tiny_judge):
    judge = OnnxRecognizer(tiny_judge[1])
    with pytest.raises(ValueError, match=r"\(K, 112, 112, 3\)"):
        judge.embed_aligned(np.zeros((1, 3, 112, 112), np.uint8))
    with pytest.raises(ValueError, match="2 images but 1"):
        judge.embed([np.zeros((10, 10, 3), np.uint8)] * 2, [Detections.empty()])
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        OnnxRecognizer(tiny_judge[1].parent / "missing.onnx")
