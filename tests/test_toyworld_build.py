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
import torch
from safetensors import safe_open

from umo.cli import main
from umo.config import Config, ConfigError, load_config, to_dict
from umo.faces.detect import FaceDetector
from umo.faces.embed import OnnxRecognizer, load_arcface
from umo.io import is_toy_world
from umo.reward import MatchingReward
from umo.toy.config import MAX_IDENTITIES, ToyEmbedderConfig, ToyWorldConfig
from umo.toy.onnx_export import export_recognizer_onnx
from umo.toy.world import identity
from umo.toy.world.build import (
    MANIFEST_FILE,
    QUALITY_FILE,
    ToyWorldError,
    build_toyworld,
    load_toyworld,
    part_keys,
)
from umo.toy.world.embedders import aligned_faces, embed, train_embedder
from umo.toy.world.mobileface import MobileFaceNet, mobilefacenet
from umo.typed import from_dict

TINY = {
    "n_identities": 30, "n_train_identities": 20, "faces_per_identity": 2, "test_faces_per_identity": 5,
    "collection": {"n_groups": 2, "images_per_group": [2, 3], "cast_size": [2, 3], "image_size": [128, 128]},
    "detector": {"steps": 3, "batch": 2, "n_scenes": 4, "width": 8},
    "reward": {"arch": "toy_r10", "num_features": 16, "epochs": 1, "batch": 8, "seed": 1},
    "judge": {"arch": "toy_r10", "num_features": 16, "epochs": 1, "batch": 8, "seed": 2},
    "second_judge": {"arch": "toy_mbf", "num_features": 16, "epochs": 1, "batch": 8, "seed": 3,
                     "identities": [30, 40]},  # past the pool
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
    assert "models/faces/toy_judge_mbf/judge_toy_mbf.onnx" in a


def test_second_build_reuses_everything_and_rebuilds_only_what_changed(built, tmp_path):
    assert built.reused == ()  # the module's build started from nothing
    out = shutil.copytree(built.world.root, tmp_path / "w")  # its folder, copied (changed below): the cache
    before = tree_hashes(out)  # holds by settings and content, wherever the folder is
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.onnx")}

    second = build_toyworld(out, tiny())
    assert set(second.reused) == {"collection", "detector", "embedders", "second_judge"}
    assert "agreement" not in second.seconds  # the judges' agreement was kept too
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.onnx")} == mtimes  # nothing rewritten
    assert tree_hashes(out) == before

    # a changed detector setting rebuilds the detector only
    third = build_toyworld(out, tiny(detector__steps=4))
    assert set(third.reused) == {"collection", "embedders", "second_judge"}
    assert tree_hashes(out)["models/faces/toy_detector/det_toy_scrfd.onnx"] != before[
        "models/faces/toy_detector/det_toy_scrfd.onnx"]

    # a corrupted file is noticed by its hash and rebuilt; the judges' agreement is measured again
    judge = third.world.judge_path
    judge.write_bytes(b"not an onnx model")
    fourth = build_toyworld(out, tiny(detector__steps=4))
    assert set(fourth.reused) == {"collection", "detector", "second_judge"} and "agreement" in fourth.seconds
    OnnxRecognizer(judge)

    # a changed second-judge setting rebuilds the second judge only
    fifth = build_toyworld(out, tiny(detector__steps=4, second_judge__seed=4))
    assert set(fifth.reused) == {"collection", "detector", "embedders"}


def test_every_artifact_says_toy(built):
    world = built.world
    for path in (world.detector_path, world.judge_path, world.second_judge_path):
        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert props["umo.world"] == "toy" and "TOY WORLD" in props["umo.notice"]
        assert "toy" in path.name
    assert all(is_toy_world(world.models / pack) for _, pack in world.judge_packs())
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
    assert world.judge_packs() == [("toy_r10", "toy_judge"), ("toy_mbf", "toy_judge_mbf")]
    for _, pack in world.judge_packs():
        judge = OnnxRecognizer.from_model_root(world.models, pack)
        assert judge.embed_aligned(np.zeros((2, 112, 112, 3), np.uint8)).shape == (2, 16)
    assert judge.model_file == world.second_judge_path

    # params.yaml pointed at the world by the printed overrides: the reward module builds from it
    config = load_config(None, world.faces_overrides())
    reward = MatchingReward.from_config(config.faces, config.reward)
    assert reward.embedder.num_features == 16


def conv_groups(path: Path) -> list[int]:
    """The `group` attribute of every Conv node of an ONNX graph (1: a full conv; > 1: grouped or depthwise)."""
    convs = [node for node in onnx.load(str(path)).graph.node if node.op_type == "Conv"]
    return [next((a.i for a in node.attribute if a.name == "group"), 1) for node in convs]


def test_second_judge_is_another_architecture_trained_on_people_past_the_pool(built):
    world, second = built.world, built.world.config.second_judge
    assert conv_groups(world.judge_path) and set(conv_groups(world.judge_path)) == {1}  # IResNet: full convs
    groups = conv_groups(world.second_judge_path)  # MobileFaceNet: depthwise convs and the GDC head
    assert sum(g > 1 for g in groups) >= 5, groups
    assert world.config.n_identities <= second.identities[0] < second.identities[1] <= MAX_IDENTITIES
    # people past the pool are as distinct from each other and from the pool's as the pool's people are
    people = [identity.make_identity(world.config.world_seed, i) for i in range(second.identities[1])]
    distances = identity.pairwise_trait_distances(people)
    assert distances[np.triu_indices(len(people), 1)].min() >= identity.MIN_TRAIT_DISTANCE
    quality = built.world.quality
    assert quality["gates"]["second_judge_tar_at_far_1e-3"] == quality["gates"]["judge_tar_at_far_1e-3"]
    assert -1 <= quality["measured"]["judges_score_correlation"] <= 1


def test_mobileface_trains_every_parameter_and_exports_as_a_recognizer(tmp_path):
    crops, labels = aligned_faces(0, range(4), 2, seed=0)
    cfg = ToyEmbedderConfig(arch="toy_mbf", num_features=16, epochs=3, batch=8, seed=0)
    torch.manual_seed(cfg.seed)  # as train_embedder does before it builds the network
    before = {k: v.clone() for k, v in mobilefacenet("toy_mbf", num_features=16).named_parameters()}
    model, losses = train_embedder(crops, labels, cfg)
    assert isinstance(model, MobileFaceNet) and len(losses) == 3
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} did not change"
    export_recognizer_onnx(model, tmp_path / "pack" / "judge_toy_mbf.onnx")
    judge = OnnxRecognizer.from_model_root(tmp_path, "pack")  # routed by insightface as a recognizer
    np.testing.assert_allclose(judge.embed_aligned(crops), embed(model, crops), atol=1e-4)


def test_second_judge_is_a_part_of_its_own(built, tmp_path):
    """Its settings touch no other part's cache key; without it the world has one judge and no such part."""
    with_it, without = part_keys(tiny()), part_keys(tiny(second_judge=None))
    assert set(with_it) - set(without) == {"second_judge"}
    assert with_it["second_judge"] != part_keys(tiny(second_judge__epochs=2))["second_judge"]
    assert {k: v for k, v in with_it.items() if k != "second_judge"} == without
    out = shutil.copytree(built.world.root, tmp_path / "w")
    one = build_toyworld(out, tiny(second_judge=None))
    assert set(one.reused) == {"collection", "detector", "embedders"} and one.world.second_judge_path is None
    assert one.world.judge_packs() == [("toy_r10", "toy_judge")]
    assert not any(k.startswith(("second_judge", "judges_")) for k in one.world.quality["measured"])
    assert load_toyworld(out).judge_packs() == [("toy_r10", "toy_judge")]


@pytest.mark.parametrize(("second_judge", "match"), [
    ({"identities": [25, 35]}, r"second_judge.identities: \[25, 35\] overlaps the held-out ids"),
    ({"identities": [5, 15]}, r"overlaps reward.identities \[0, 20\)"),  # the reward learns every training id
    ({"identities": None}, r"second_judge.identities: expected \[first, last\)"),
    ({"identities": [2000, 2100]}, r"reaches past the 2016 distinct toy identities"),
    ({"arch": "toy_r10", "seed": 2}, r"second_judge: must differ from the judge in seed or arch"),
])
def test_second_judge_settings_are_checked(second_judge, match):
    data = json.loads(json.dumps(TINY))
    data["second_judge"] |= second_judge
    with pytest.raises(ConfigError, match=match):
        from_dict(ToyWorldConfig, data)


def test_second_judge_ids_stay_clear_of_the_reward_and_the_judge():
    data = json.loads(json.dumps(TINY)) | {"n_identities": 500, "n_train_identities": 400}
    data["reward"] |= {"identities": [0, 200]}
    data["judge"] |= {"identities": [200, 300]}
    data["second_judge"] |= {"identities": [290, 310]}
    with pytest.raises(ConfigError, match=r"overlaps judge.identities \[200, 300\)"):
        from_dict(ToyWorldConfig, data)
    data["second_judge"] |= {"identities": [300, 400]}  # training ids nobody else learns: allowed
    assert from_dict(ToyWorldConfig, data).second_judge.identities == [300, 400]
    data["reward"] |= {"arch": "toy_mbf"}
    with pytest.raises(ConfigError, match="reward.arch: .* can only be a judge"):
        from_dict(ToyWorldConfig, data)
    assert MAX_IDENTITIES == identity.MAX_IDENTITIES
    assert ToyWorldConfig().second_judge.identities == [500, 700]  # the default: past the default pool of 500


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
    assert "second_judge_tar_at_far_1e-3" in out and "judges_score_correlation" in out
    params.write_text(json.dumps(data | {"toyworld": to_dict(tiny(quality__min_precision=1.01))}))
    assert main(["toyworld", "build", "--params", str(params), "--out", str(tmp_path / "w")]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_the_kept_small_world_matches_the_sources():
    """tests/fixtures/toy-world-small holds the small world's trained models, so that a fresh clone does not train
    them (tests/toyworlds.py). A change to the sources, settings or library versions they depend on makes the
    build train them again, correctly but for minutes: refresh them then."""
    from toyworlds import FIXTURE, KEPT, stale_parts

    stale = stale_parts()
    assert not stale, (f"{FIXTURE}: the kept {', '.join(stale)} no longer match this checkout's toy world (sources, "
                       "settings or library versions): run `make test-world` and commit tests/fixtures")
    kept = json.loads((FIXTURE / "toyworld_build.json").read_text())
    for name in KEPT:  # every kept file is there, as the manifest hashed it
        for rel, digest in kept["parts"][name]["files"].items():
            assert hashlib.sha256((FIXTURE / rel).read_bytes()).hexdigest() == digest, rel
