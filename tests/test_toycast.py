"""The toy base generator (umo.toy.cast): the cast's photos, the step cache, and the gate that refuses a base that
cannot show anything. The base's measured numbers are the README's and docs/ablation.md's (`umo toybase build`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from umo.toy.cast import UninformativeBase, build_toybase, check_gate, photo_plan, render_cast_photo
from umo.toy.config import ToyBaseConfig, ToyCastPhotosConfig
from umo.toy.world.collection import plan_sessions, render_group_image
from umo.toy.world.identity import make_identity
from umo.toy.world.render import head_strip, render_group
from umo.typed import from_dict


def test_fixed_slots_put_person_k_in_slot_k_and_repeats_draw_one_person_twice():
    people = [make_identity(0, 403), make_identity(0, 411)]
    for seed in range(5):
        scene = render_group(0, people, np.random.default_rng(seed), 128, shuffle=False)
        assert scene.identity_ids.tolist() == [403, 411]  # faces are ordered left to right
    twice = render_group(0, [people[1]] * 2, np.random.default_rng(0), 128, shuffle=False, repeats=True)
    assert twice.identity_ids.tolist() == [411, 411]
    with pytest.raises(ValueError, match="distinct"):
        render_group(0, [people[1]] * 2, np.random.default_rng(0), 128)


def test_head_strip_keeps_the_faces_and_moves_their_truth():
    scene = render_group(0, [make_identity(0, 400), make_identity(0, 401)], np.random.default_rng(1), 128)
    strip = head_strip(scene, 80)
    top = int(round(0.4 * 128 - 40))
    assert strip.image.shape == (80, 128, 3)
    np.testing.assert_array_equal(strip.image, scene.image[top:top + 80])
    np.testing.assert_allclose(strip.boxes[:, [1, 3]], scene.boxes[:, [1, 3]] - top)
    np.testing.assert_allclose(strip.landmarks[..., 0], scene.landmarks[..., 0])
    assert (strip.boxes[:, 1] >= 0).all() and (strip.boxes[:, 3] <= 80).all()


def test_sessions_show_two_people_of_the_cast_per_photo():
    plans = plan_sessions(0, 12, images_per_group=(6, 10), cast_size=(2, 3), cast=(400, 416))
    assert plans == plan_sessions(0, 12, images_per_group=(6, 10), cast_size=(2, 3), cast=(400, 416))
    for plan in plans:
        assert all(400 <= i < 416 for i in plan.cast) and 2 <= len(plan.cast) <= 3
        assert all(len(set(pair)) == 2 and set(pair) <= set(plan.cast) for pair in plan.images)
    scene = render_group_image(0, 0, plans[0], 0, (80, 128))
    assert scene.image.shape == (80, 128, 3) and sorted(scene.identity_ids.tolist()) == list(plans[0].images[0])


def test_photo_plan_duplicates_only_train_photos_at_the_set_rate():
    plan = photo_plan(ToyCastPhotosConfig(n_train=2000, n_test=50, duplicate_p=0.3), (400, 416))
    dup = [r[3] for r in plan["train"]]
    assert abs(np.mean([d is not None for d in dup]) - 0.3) < 0.04
    assert all(r[3] is None for r in plan["test"])
    assert all(a != b and 400 <= a < 416 and 400 <= b < 416 for _, (a, b), _, _ in plan["train"])
    image, refs = render_cast_photo(0, (400, 401), 7, ToyCastPhotosConfig(), (80, 128), duplicate=1)
    assert image.shape == (80, 128, 3) and [r.shape for r in refs] == [(64, 64, 3)] * 2


def _metrics(two_face, id_sim, id_conf):
    return {"face_count_accuracy": two_face, "id_sim": id_sim, "id_conf": id_conf, "id_match": 10.0, "items": 64,
            "unscored": 0}


@pytest.mark.parametrize(("metrics", "passed", "named"), [
    (_metrics(0.9, 25.0, 60.0), True, None),
    (_metrics(0.5, 25.0, 60.0), False, "2-face rate 0.5 < 0.85"),
    (_metrics(0.9, 12.0, 60.0), False, "ID-Sim 12.0 < 20.0"),
    (_metrics(0.9, 25.0, 80.0), False, "ID-Conf 80.0 outside [45.0, 75.0]"),
    (_metrics(0.9, 25.0, None), False, "ID-Conf None outside"),  # no image with 2 faces: not measured
    (_metrics(None, None, None), False, "2-face rate None"),
])
def test_gate_decides_on_each_bound(metrics, passed, named):
    decision = check_gate(metrics, ToyBaseConfig())
    assert decision["passed"] is passed
    if named:
        assert any(named in f for f in decision["failures"]), decision["failures"]


TINY_BASE = {
    "photos": {"cast": [200, 216], "image_size": [80, 128], "n_train": 24, "n_test": 3},
    "vae": {"channels": [8, 8, 8, 8], "latent_channels": 4, "steps": 3, "batch": 4, "crop": 32},
    "model": {"heads": 2, "head_dim": 16, "double_blocks": 1, "single_blocks": 1, "steps": 3, "batch": 4,
              "warmup": 1, "compile": False},
    "gate": {"images_per_item": 1, "steps": 2},
}


@pytest.mark.slow
def test_an_untrained_base_is_refused_with_its_numbers_and_its_steps_are_cached(toy_world, tmp_path):
    data = json.loads(json.dumps(TINY_BASE)) | {"toyworld": str(toy_world.root), "out": str(tmp_path / "base")}
    cfg = from_dict(ToyBaseConfig, data, source="test")
    with pytest.raises(UninformativeBase, match="uninformative base: 2-face rate"):
        build_toybase(cfg, workers=1)
    gate = json.loads((tmp_path / "base" / "gate.json").read_text())
    assert gate["passed"] is False and gate["items"] == 3 and gate["measured"]["two_face_rate"] < 0.85
    manifest = json.loads((tmp_path / "base" / "toybase_build.json").read_text())
    assert set(manifest["seconds"]) == {"photos", "vae", "generator", "gate", "total"}
    assert (tmp_path / "base" / "generator" / "model_index.json").is_file()
    trained_with = json.loads((tmp_path / "base" / "generator" / "umo_trained_with.json").read_text())
    assert trained_with == {"resolution": [80, 128], "reference_resolution": list(cfg.reference_resolution),
                            "max_sequence_length": cfg.max_sequence_length}  # what the chain must set (test_models)
    first = {p: p.read_bytes() for p in (tmp_path / "base" / "generator").rglob("*.safetensors")}

    # a changed gate re-judges the same base; a changed model setting keeps the photos and the VAE
    data["gate"]["min_two_face_rate"] = 0.0
    with pytest.raises(UninformativeBase):
        build_toybase(from_dict(ToyBaseConfig, data, source="test"), workers=1)
    manifest = json.loads((tmp_path / "base" / "toybase_build.json").read_text())
    assert set(manifest["seconds"]) == {"gate", "total"}
    assert {p: p.read_bytes() for p in first} == first
    data["model"]["steps"] = 4
    with pytest.raises(UninformativeBase):
        build_toybase(from_dict(ToyBaseConfig, data, source="test"), workers=1)
    manifest = json.loads((tmp_path / "base" / "toybase_build.json").read_text())
    assert set(manifest["seconds"]) == {"generator", "gate", "total"}


def test_mismatched_samples_get_another_samples_references():
    from umo.toy.base import mismatch

    g = torch.Generator().manual_seed(0)
    refs, pool = torch.zeros(400, 4, 2), torch.arange(1, 6, dtype=torch.float).view(5, 1, 1).expand(5, 4, 2)
    out = mismatch(refs, pool, 0.25, g)
    swapped = (out != 0).any(dim=(1, 2))
    assert 0.15 < swapped.float().mean() < 0.35  # about p of the batch
    assert ((out[swapped] >= 1) & (out[swapped] <= 5)).all()  # whole references of the pool's samples
    assert (out[swapped] == out[swapped][:, :1, :1]).all()
    assert (refs == 0).all()  # the input is kept
    assert (mismatch(refs, pool, 0.0, g) == 0).all()


def test_the_scaling_set_holds_every_count_of_people_and_loads_as_xversebench(toy_world, tmp_path):
    """2 to 5 people of the cast per item, each a new draw with a new portrait per person, in the XVerseBench JSON
    format (every reference under human/, so every one is scored); deterministic; the cast bounds the counts."""
    from umo.eval.sets import load_xverse
    from umo.images import read_rgb
    from umo.toy.scaling import write_scaling_set

    data = json.loads(json.dumps(TINY_BASE)) | {"toyworld": str(toy_world.root),
                                                "scaling": {"identities": [2, 5], "items_per_count": 2}}
    cfg = from_dict(ToyBaseConfig, data, source="test")
    stats = write_scaling_set(cfg, tmp_path / "a")
    assert stats["items_by_identities"] == {"2": 2, "3": 2, "4": 2, "5": 2} and stats["references"] == 28
    items = load_xverse(tmp_path / "a" / "scaling.json")
    assert [i.n_identities for i in items] == [2, 2, 3, 3, 4, 4, 5, 5]
    assert all(i.identities == tuple(range(i.n_identities)) for i in items)  # every reference is a person
    raw = json.loads((tmp_path / "a" / "scaling.json").read_text())
    assert all(len(set(r["identities"])) == len(r["identities"]) and set(r["identities"]) <= set(range(200, 216))
               for r in raw)  # different people of the cast in each item
    assert raw[0]["identities"] != raw[1]["identities"]
    assert read_rgb(items[0].references[0]).shape == (64, 64, 3)  # the photos' reference crops
    write_scaling_set(cfg, tmp_path / "b")
    assert (tmp_path / "a" / "scaling.json").read_bytes() == (tmp_path / "b" / "scaling.json").read_bytes()
    assert all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes()
               for p in ("human/n05-001-4.png", "human/n02-000-0.png"))
    data["scaling"]["identities"] = [2, 17]
    with pytest.raises(ValueError, match=r"toybase.scaling.identities \[2, 17\]: the cast has only 16 people"):
        write_scaling_set(from_dict(ToyBaseConfig, data, source="test"), tmp_path / "c")
    assert not (tmp_path / "c").exists()
