"""`umo prepare` end to end on the toy worlds: real face models (the toy ones, in the real formats), the real CLI,
the tiny generator for the synthetic part, a group of bad files beside the toy albums."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from badfiles import write_bad_corpus
from PIL import Image

from umo.config import load_config
from umo.data.manifest import load_embeddings, read_manifest
from umo.data.prepare import SAMPLES_DIR, _load_models, read_truth
from umo.data.synthetic import Pick, check_generated, synthesize

ROOT = Path(__file__).resolve().parents[1]
UMO = Path(sys.executable).parent / "umo"


def prepare_args(world, tmp: Path, *extra: str) -> list[str]:
    sets = [*world.faces_overrides(), f"prepare.raw={tmp / 'data'}", f"prepare.out={tmp / 'prepared'}",
            f"prepare.face_cache={tmp / 'face_index'}", f"prepare.truth={world.truth}", *extra]
    return [str(UMO), "prepare", "--params", str(ROOT / "params.yaml"), *[a for s in sets for a in ("-S", s)]]


def run_prepare(world, tmp: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(prepare_args(world, tmp, *extra), capture_output=True, text=True, cwd=tmp)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def prepared(toy_world, tiny_generator_dir, tmp_path_factory):
    """The small toy world's albums plus a group of bad files, prepared with 3 synthetic attempts."""
    tmp = tmp_path_factory.mktemp("prepare")
    shutil.copytree(toy_world.raw, tmp / "data")
    write_bad_corpus(tmp, group="zz_bad_files")
    done = run_prepare(toy_world, tmp, f"generator.path={tiny_generator_dir}", "prepare.synthetic.count=3")
    stats = json.loads((tmp / "prepared" / "stats.json").read_text())
    return tmp, stats, done


def test_manifests_are_valid_and_every_sample_follows_the_rules(prepared, toy_world):
    tmp, stats, _ = prepared
    out = tmp / "prepared" / SAMPLES_DIR
    train, test = read_manifest(out / "train.json"), read_manifest(out / "test.json")
    assert train.toy_world and train.embedder["sha256"] and len(train.samples) > 10 and len(test.samples) >= 1
    truth = read_truth(toy_world.truth)
    for manifest in (train, test):
        embeddings = load_embeddings(manifest)
        for s in manifest.samples:
            if s.source == "synthetic" or s.group == "zz_bad_files":
                continue
            row = truth[(s.group, s.id.split(f"{s.group}-", 1)[1] + ".png")]
            assert len(s.references) == len(row["identity_ids"]) <= 4  # one reference per person in the target
            assert embeddings[s.id].shape == (len(s.references), 128)
            target = np.asarray(Image.open(manifest.path(s.target)))
            assert target.shape == (256, 256, 3)  # the decoded target, as a plain RGB PNG
            for r in s.references:
                assert r.identity.startswith(f"{s.group}/")  # references come from the target's own group
                assert Image.open(manifest.path(r.path)).size == (128, 128)
                assert not r.path.startswith(f"references/{s.id}-")  # never a crop of the target itself
            assert s.prompt == row["caption"]  # the toy albums have captions
    samples = stats["samples"]["train"]
    assert samples["total"] == len(train.samples)
    assert sum(v for k, v in samples.items() if k.endswith("_people")) == samples["total"]


def test_split_is_by_group_and_no_person_is_in_both_splits(prepared):
    tmp, stats, _ = prepared
    out = tmp / "prepared" / SAMPLES_DIR
    train, test = read_manifest(out / "train.json"), read_manifest(out / "test.json")
    real = lambda m: [s for s in m.samples if s.source == "real"]  # noqa: E731
    assert not {s.group for s in real(train)} & {s.group for s in real(test)}
    identities = lambda m: {r.identity for s in m.samples for r in s.references}  # noqa: E731
    assert not identities(train) & identities(test)
    # people recur across the toy albums: by the ground truth, none of them is left in both splits
    quality = stats["identities"]["quality"]
    assert quality["split_leaks"] == 0
    assert stats["groups"]["train"] + stats["groups"]["test"] == stats["groups"]["with_samples"]


def test_bad_files_are_skipped_and_counted_never_fatal(prepared):
    tmp, stats, _ = prepared
    assert stats["rejects"]["files"] == {"empty_file": 1, "truncated": 1, "not_an_image": 1, "too_large": 1,
                                         "outside_root": 1, "duplicate": 1, "too_small": 1, "bad_caption_path": 2,
                                         "bad_caption_line": 1, "caption_for_missing_image": 1}
    assert stats["converted"] == {"alpha": 1, "cmyk": 1, "exif_rotated": 1, "grayscale": 2, "high_bit_depth": 1}
    # every skipped file is findable by name, not only with -v
    listed = [json.loads(line) for line in (tmp / "prepared" / "skipped_files.jsonl").read_text().splitlines()]
    assert len(listed) == sum(stats["rejects"]["files"].values()) == 11
    assert {d["reason"] for d in listed} == set(stats["rejects"]["files"])
    assert any(d["reason"] == "truncated" and d["file"].endswith(".jpg") for d in listed)
    # only the files that passed the scan can become samples; random pixels mostly hold no face, and every such
    # image that made no sample is counted among the sample rejects
    manifests = [read_manifest(tmp / "prepared" / SAMPLES_DIR / f"{s}.json") for s in ("train", "test")]
    usable = {"good", "photo", "cmyk", "deep16", "alpha", "grey", "rotated"}
    made = {s.id.removeprefix("zz_bad_files-") for m in manifests for s in m.samples if s.group == "zz_bad_files"}
    assert made <= usable
    assert stats["rejects"]["samples"]["target_no_face"] >= 1
    assert sum(stats["rejects"]["samples"].values()) >= len(usable - made)


def test_cluster_quality_and_stats_are_reported(prepared, toy_world):
    tmp, stats, _ = prepared
    quality = stats["identities"]["quality"]
    # the SMALL world's weaker embedder (TAR 0.80); the full world's bar is tested below
    assert quality["purity"] >= 0.85 and quality["completeness"] >= 0.75
    assert quality["faces_scored"] + quality["faces_without_truth"] == stats["images"]["faces"]
    sheet = Image.open(tmp / "prepared" / "contact_sheet.png")
    assert sheet.size[0] >= 256 and sheet.size[1] >= 128


def test_synthetic_part_runs_with_the_tiny_generator_and_counts_everything(prepared):
    _, stats, _ = prepared
    synthetic = stats["synthetic"]
    assert synthetic["attempted"] == 3
    assert synthetic["kept"] + sum(stats["rejects"]["synthetic"].values()) == 3
    assert stats["samples"]["train"]["synthetic"] == synthetic["kept"]


def test_a_rerun_reuses_the_face_index_and_writes_the_same_manifests(prepared, toy_world, tiny_generator_dir):
    tmp, stats, _ = prepared
    before = {p: (tmp / "prepared" / SAMPLES_DIR / p).read_bytes() for p in ("train.json", "test.json")}
    run_prepare(toy_world, tmp, f"generator.path={tiny_generator_dir}", "prepare.synthetic.count=3")
    again = json.loads((tmp / "prepared" / "stats.json").read_text())
    assert again["images"]["index_computed"] == 0
    assert again["images"]["index_cached"] == stats["images"]["usable"] == stats["images"]["index_computed"]
    assert {p: (tmp / "prepared" / SAMPLES_DIR / p).read_bytes() for p in before} == before


def test_mistakes_are_clear_errors_and_leave_the_previous_outputs_whole(prepared, toy_world, tmp_path):
    tmp, _, _ = prepared
    before = (tmp / "prepared" / SAMPLES_DIR / "train.json").read_bytes()
    done = run_prepare(toy_world, tmp, "generator.path=/nonexistent/generator", "prepare.synthetic.count=2",
                       check=False)
    assert done.returncode == 2 and "/nonexistent/generator" in done.stderr and "Traceback" not in done.stderr
    assert (tmp / "prepared" / SAMPLES_DIR / "train.json").read_bytes() == before
    assert not list((tmp / "prepared").glob(".samples.tmp*"))
    done = run_prepare(toy_world, tmp, f"prepare.raw={tmp_path / 'nothing'}", check=False)
    assert done.returncode == 2 and "no such folder" in done.stderr
    bad_truth = tmp_path / "truth.jsonl"
    bad_truth.write_text('{"group": "g"}\n')
    done = run_prepare(toy_world, tmp, f"prepare.truth={bad_truth}", "prepare.synthetic.count=0", check=False)
    assert done.returncode == 2 and f"{bad_truth}:1" in done.stderr


def test_generated_images_are_kept_only_when_every_reference_is_matched(toy_world):
    """The keep rule on real detections and embeddings: collages of the references' own crops stand in for a
    generator that works (the tiny one draws no faces)."""
    config = load_config(ROOT / "params.yaml", toy_world.faces_overrides())
    embedder, _ = _load_models(config.faces, config.prepare.index_batch, "cpu")
    truth = [json.loads(line) for line in toy_world.truth.read_text().splitlines()]
    solo = [t for t in truth if len(t["identity_ids"]) == 1]
    people = {}
    for t in solo:  # one crop per person, from single-person images
        people.setdefault(t["identity_ids"][0], t)
    rows = list(people.values())[:3]

    def crop(row) -> np.ndarray:
        rgb = np.asarray(Image.open(toy_world.raw / row["group"] / row["image"]).convert("RGB"))
        x1, y1, x2, y2 = (int(v) for v in row["boxes"][0])
        pad = (x2 - x1) // 3
        return rgb[max(0, y1 - pad):y2 + pad, max(0, x1 - pad):x2 + pad]

    crops = [np.asarray(Image.fromarray(crop(r)).resize((120, 120))) for r in rows]

    def collage(members) -> np.ndarray:
        canvas = np.full((256, 256 * len(members) // 2 + 128, 3), 200, np.uint8)
        for k, m in enumerate(members):
            canvas[60:180, 20 + 130 * k:140 + 130 * k] = crops[m]
        return canvas

    def embed(rgb):
        (_, emb), = embedder([rgb])
        return emb

    references = {k: embed(collage([k]))[0] for k in range(3)}
    renders = {0: collage([0, 1]), 1: collage([0, 2]), 2: collage([0]), 3: collage([0, 1, 2])}
    picks = [Pick(0, (0, 1)), Pick(1, (0, 1)), Pick(2, (0, 1)), Pick(3, (0, 1))]
    stats = Counter()
    kept = synthesize(picks, render=lambda p: renders[p.attempt], embed=embed,
                      references=lambda p: np.stack([references[i] for i in p.identities]), tau=0.5, stats=stats,
                      progress=False)
    assert [p.attempt for p, _, _ in kept] == [0]
    assert min(kept[0][2]) >= 0.5
    assert stats == Counter(attempted=4, kept=1, below_threshold=1, missing_faces=1, extra_faces=1)
    assert check_generated(np.stack([references[0]]), np.zeros((0, 128)), 0.5)[1] == "no_face"


@pytest.mark.slow
def test_the_default_collection_clusters_at_the_bar(default_raw, toy_world, tmp_path):
    """The bar on THE toy world's collection (params.yaml's: the embedded default's data/, byte for byte as
    data.dvc records, test_default_data): identities clustered with purity and completeness >= 0.95.

    The faces are found and embedded by the small world's models, not by params.yaml's world's, whose build
    alone took 5.5 of a fresh clone's 15.5 test minutes. The property is the clustering's on these albums (48
    sessions of 2-3 people from 16 ids no face model has seen, two per 80 x 128 photo), and it holds with the
    weaker models: measured 0.973 / 0.965 with the small world's (reward TAR@FAR1e-3 0.80, 250-step detector)
    against 0.979 / 0.965 with params.yaml's (TAR 0.95, 600 steps) on the same collection, the default
    cluster_threshold for both. params.yaml's world is held to its own gates by its build (TAR >= 0.90), and
    `make run` records this same quality in artifacts/prepared/stats.json."""
    data, truth = default_raw
    (tmp_path / "data").symlink_to(data)
    run_prepare(toy_world, tmp_path, f"prepare.truth={truth}", "prepare.synthetic.count=0", "prepare.contact_sheet=0")
    stats = json.loads((tmp_path / "prepared" / "stats.json").read_text())
    quality = stats["identities"]["quality"]
    faces = sum(len(row["identity_ids"]) for row in read_truth(truth).values())  # 748 people in 374 photos
    # every session makes samples, and nearly every face is clustered and scored (0.95 of them measured)
    assert stats["groups"]["with_samples"] == 48 and quality["faces_scored"] >= 0.9 * faces, (stats["groups"], quality)
    assert quality["purity"] >= 0.95 and quality["completeness"] >= 0.95, quality


def test_sample_ids_are_unique_and_safe_by_construction():
    """Ids were once `<group>-<stem>`, so x.png and x.jpg of one group, or group a's b-c.png and group a-b's
    c.png, collided and aborted prep with an error naming a temporary manifest; names with newlines reached ids."""
    import re

    from umo.data.ingest import RawImage
    from umo.data.prepare import sample_ids

    paths = ["g/x.png", "g/x.jpg", "a/b-c.png", "a-b/c.png", "g/new\nline.png", "g/../up.png", "s/shot_0001.png"]
    ids = sample_ids([RawImage(p.split("/")[0], p, "", 1, 1) for p in paths])
    assert len(set(ids.values())) == len(paths)
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", i) for i in ids.values()), ids
    assert ids["s/shot_0001.png"] == "s-shot_0001" and ids["a/b-c.png"] == "a-b-c"  # readable ones stay as they were
    # a file named like another's hashed id: an error naming both files, before anything is written
    taken = ids["g/x.png"]
    clash = [RawImage("g", "g/x.png", "", 1, 1), RawImage("g", "g/x.jpg", "", 1, 1),
             RawImage(taken.split("-")[0], f"{taken.split('-')[0]}/{taken.split('-', 1)[1]}.png", "", 1, 1)]
    with pytest.raises(ValueError, match=rf"sample id '{taken}': both g/x.png and g/x-[0-9a-f]{{12}}.png .*rename"):
        sample_ids(clash)
