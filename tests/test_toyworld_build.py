"""`umo toyworld build`: byte-identical rebuilds, the cache, toy labelling, quality gates and the real loaders.

Tiny settings keep each build to a few seconds; the quality of the full-size world is measured by the
build itself (`umo toyworld build`, benchmarks/toyworld_build.py), and of the small test world by
test_toyworld_quality.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from safetensors import safe_open

from umo.cli import main
from umo.config import Config, load_config, to_dict
from umo.faces.detect import FaceDetector
from umo.faces.embed import OnnxRecognizer, load_arcface
from umo.reward import MatchingReward
from umo.toy.config import ToyWorldConfig
from umo.toy.world.build import (
    MANIFEST_FILE,
    QUALITY_FILE,
    ToyWorldError,
    build_toyworld,
    load_toyworld,
)
from umo.typed import from_dict

TINY = {
    "n_identities": 30, "n_train_identities": 20, "faces_per_identity": 2, "test_faces_per_identity": 5,
    "collection": {"n_groups": 2, "images_per_group": [2, 3], "cast_size": [2, 3], "image_size": [128, 128]},
    "detector": {"steps": 3, "batch": 2, "n_scenes": 4, "width": 8},
    "reward": {"arch": "toy_r10", "num_features": 16, "epochs": 1, "batch": 8, "seed": 1},
    "judge": {"arch": "toy_r10", "num_features": 16, "epochs": 1, "batch": 8, "seed": 2},
    "quality": {"eval_scenes": 4, "min_precision": 0.0, "min_recall": 0.0, "min_tar": 0.0},
}


def tiny(**changes) -> ToyWorldConfig:
    data = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        section, _, name = key.rpartition("__")
        (data[section] if section else data)[name] = value
    return from_dict(ToyWorldConfig, data)


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "world"
    return build_toyworld(out, tiny())


def test_two_builds_are_byte_identical(built, tmp_path):
    again = build_toyworld(tmp_path / "again", tiny(), workers=1)  # another folder, another process layout
    a, b = tree_hashes(built.world.root), tree_hashes(again.world.root)
    assert a == b
    assert len(a) > 10 and "models/faces/toy_detector/det_toy_scrfd.onnx" in a


def test_second_build_reuses_everything_and_rebuilds_only_what_changed(built, tmp_path):
    assert built.reused == ()  # the module's build started from nothing
    out = shutil.copytree(built.world.root, tmp_path / "w")  # its folder, copied (changed below): the cache
    before = tree_hashes(out)  # holds by settings and content, wherever the folder is
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.onnx")}

    second = build_toyworld(out, tiny())
    assert set(second.reused) == {"collection", "detector", "embedders"}
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.onnx")} == mtimes  # nothing rewritten
    assert tree_hashes(out) == before

    # a changed detector setting rebuilds the detector only
    third = build_toyworld(out, tiny(detector__steps=4))
    assert set(third.reused) == {"collection", "embedders"}
    assert tree_hashes(out)["models/faces/toy_detector/det_toy_scrfd.onnx"] != before[
        "models/faces/toy_detector/det_toy_scrfd.onnx"]

    # a corrupted file is noticed by its hash and rebuilt
    judge = third.world.judge_path
    judge.write_bytes(b"not an onnx model")
    fourth = build_toyworld(out, tiny(detector__steps=4))
    assert set(fourth.reused) == {"collection", "detector"}
    OnnxRecognizer(judge)


def test_every_artifact_says_toy(built):
    world = built.world
    for path in (world.detector_path, world.judge_path):
        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert props["umo.world"] == "toy" and "TOY WORLD" in props["umo.notice"]
        assert "toy" in path.name
    with safe_open(str(world.reward_path), "pt") as f:
        assert json.loads(f.metadata()["umo"])["umo.world"] == "toy"
    assert "toy" in world.reward_path.name
    assert json.loads((world.raw / "toyworld.json").read_text())["toy_world"] is True
    manifest = json.loads((world.root / MANIFEST_FILE).read_text())
    assert manifest["world"] == "toy" and "TOY WORLD" in manifest["notice"]
    assert json.loads((world.root / QUALITY_FILE).read_text())["world"] == "toy"
    assert all(part.startswith("toy") or part == "models" for part in {p.name for p in world.root.iterdir()}
               if part not in (MANIFEST_FILE,))


def test_models_load_through_the_real_loaders_and_plug_into_the_reward(built):
    world = load_toyworld(built.world.root, verify=True)
    assert FaceDetector.from_model_root(world.models, "toy_detector").model_file == world.detector_path
    assert load_arcface(world.reward_path, "toy_r10").num_features == 16
    judge = OnnxRecognizer.from_model_root(world.models, "toy_judge")
    assert judge.embed_aligned(np.zeros((2, 112, 112, 3), np.uint8)).shape == (2, 16)

    # params.yaml pointed at the world by the printed overrides: the reward module builds from it
    config = load_config(None, world.faces_overrides())
    reward = MatchingReward.from_config(config.faces, config.reward)
    assert reward.embedder.num_features == 16


def test_quality_gates_refuse_a_weak_world(tmp_path):
    weak = tiny(quality__min_recall=0.99, quality__min_tar=0.99)
    with pytest.raises(ToyWorldError, match=r"below its quality gates: .*detector_recall"):
        build_toyworld(tmp_path / "weak", weak)
    quality = json.loads((tmp_path / "weak" / QUALITY_FILE).read_text())
    assert quality["passed"] is False and quality["gates"]["detector_recall"] == 0.99
    with pytest.raises(ToyWorldError, match="below its quality gates"):
        load_toyworld(tmp_path / "weak")
    # the cache still holds: a rebuild re-checks the gates without retraining
    with pytest.raises(ToyWorldError):
        build_toyworld(tmp_path / "weak", weak)


def test_load_refuses_missing_and_corrupted_worlds(built, tmp_path):
    with pytest.raises(ToyWorldError, match="no toy world here"):
        load_toyworld(tmp_path)
    copy = shutil.copytree(built.world.root, tmp_path / "copy")  # a whole world (the module's), to damage
    (copy / "toy_raw_truth.jsonl").write_text("edited\n")
    load_toyworld(copy)  # cheap check: files present
    with pytest.raises(ToyWorldError, match=r"toy_raw_truth.jsonl: sha256 differs"):
        load_toyworld(copy, verify=True)


def test_cli_build_prints_the_quality_table(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    data = to_dict(Config())
    data["toyworld"] = to_dict(tiny())
    params.write_text(json.dumps(data))
    assert main(["toyworld", "build", "--params", str(params), "--out", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    assert "detector_recall" in out and "judge_tar_at_far_1e-3" in out and "reused: nothing" in out
    params.write_text(json.dumps(data | {"toyworld": to_dict(tiny(quality__min_precision=1.01))}))
    assert main(["toyworld", "build", "--params", str(params), "--out", str(tmp_path / "w")]) == 1
    assert "FAIL" in capsys.readouterr().out
