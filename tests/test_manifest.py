"""The sample manifest schema: strict on read and write, paths confined to the manifest's folder."""

from __future__ import annotations

import json

import pytest
import torch

from umo.data.manifest import (
    Manifest,
    ManifestError,
    Reference,
    Sample,
    load_embeddings,
    read_manifest,
    write_manifest,
)


def make(tmp_path, n=2):
    for i in range(n):
        for name in (f"t{i}.png", f"r{i}a.png", f"r{i}b.png"):
            (tmp_path / name).write_bytes(b"x")
    samples = [Sample(f"s{i}", "g0", "two people", f"t{i}.png",
                      (Reference("g0/a", f"r{i}a.png"), Reference("g0/b", f"r{i}b.png"))) for i in range(n)]
    emb = {f"s{i}": torch.nn.functional.normalize(torch.randn(2, 8), dim=1) for i in range(n)}
    return Manifest("train", samples, toy_world=True, embedder={"sha256": "abc"}), emb


def test_round_trip(tmp_path):
    manifest, emb = make(tmp_path)
    path = write_manifest(manifest, tmp_path / "train.json", emb)
    back = read_manifest(path)
    assert back.samples == manifest.samples and back.toy_world and back.embedder == {"sha256": "abc"}
    loaded = load_embeddings(back)
    assert all(torch.allclose(loaded[k], emb[k]) for k in emb)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(version=2), "version 2"),
    (lambda d: d.update(extra=1), "unknown keys \\['extra'\\]"),
    (lambda d: d["samples"][0].update(target="../outside.png"), "samples\\[0\\].target: '../outside.png' must be"),
    (lambda d: d["samples"][0].update(target="/etc/passwd"), "must be a relative path"),
    (lambda d: d["samples"][1].update(id="s0"), "samples\\[1\\].id: 's0' is empty or not unique"),
    (lambda d: d["samples"][0].update(references=[]), "at least one reference"),
    (lambda d: d["samples"][0]["references"][1].update(identity="g0/a"), "an identity appears twice"),
    (lambda d: d["samples"][0]["references"][0].update(path="t0.png"), "target image may not be a reference"),
    (lambda d: d["samples"][0].update(source="web"), "source: expected one of"),
    (lambda d: d["samples"][0].update(prompt=" "), "prompt: empty"),
    (lambda d: d["samples"][0].update(prompt="x" * 20_001), "prompt: 20001 characters, more than 20000"),
    (lambda d: d.update(toy_world="yes"), "toy_world: expected bool"),
])
def test_bad_manifests_name_the_file_and_field(tmp_path, edit, message):
    manifest, emb = make(tmp_path)
    path = write_manifest(manifest, tmp_path / "train.json", emb)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message) as err:
        read_manifest(path)
    assert str(path) in str(err.value)


def test_missing_files_and_bad_embeddings(tmp_path):
    manifest, emb = make(tmp_path)
    path = write_manifest(manifest, tmp_path / "train.json", emb)
    (tmp_path / "r1b.png").unlink()
    with pytest.raises(ManifestError, match="1 files it names do not exist.*r1b.png"):
        read_manifest(path)
    with pytest.raises(ManifestError, match="expected \\(2, D\\)"):
        write_manifest(manifest, tmp_path / "again.json", emb | {"s1": emb["s1"][:1]})
    with pytest.raises(ManifestError, match="L2-normalized"):
        write_manifest(manifest, tmp_path / "again.json", emb | {"s1": emb["s1"] * 2})
    with pytest.raises(ManifestError, match="missing \\['s1'\\]"):
        write_manifest(manifest, tmp_path / "again.json", {"s0": emb["s0"]})
    assert not (tmp_path / "again.json").exists()


def test_a_symlink_that_leads_out_of_the_folder_is_refused_not_followed(tmp_path):
    """Paths are checked after resolving symlinks, not by their text alone."""
    folder = tmp_path / "samples"
    folder.mkdir()
    manifest, emb = make(folder)
    path = write_manifest(manifest, folder / "train.json", emb)
    (tmp_path / "secret.png").write_bytes(b"y")
    (folder / "r1b.png").unlink()
    (folder / "r1b.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(ManifestError, match=r"train.json: .*'r1b.png' resolves to .*secret.png, outside the manifest"):
        read_manifest(path)
    back = read_manifest(path, check_files=False)
    with pytest.raises(ManifestError, match="outside the manifest's folder"):
        back.path("r1b.png")  # what training and evaluation open
    assert back.path("r0a.png") == (folder / "r0a.png").resolve()
