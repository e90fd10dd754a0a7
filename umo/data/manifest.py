"""The sample manifest: what data prep writes and what training and evaluation read.

One JSON file per split, beside the files it names:

    {"schema": "umo.samples", "version": 1, "split": "train", "toy_world": true,
     "embeddings": "reference_embeddings.safetensors",
     "embedder": {"path": "models/faces/arcface_toy_r18.safetensors", "sha256": "..."},
     "samples": [{"id": "g003-0007", "group": "g003", "source": "real",
                  "prompt": "two friends at a picnic", "target": "targets/g003-0007.png",
                  "references": [{"identity": "g003/p1", "path": "references/g003-0002-p1.png"}, ...]}]}

- Paths are relative to the manifest's folder and may not leave it (no absolute paths, no `..`).
- `embeddings` holds one (M, D) float tensor per sample id: the L2-normalized reward-embedder embeddings of
  its M references, in the order of `references` (computed once by data prep; the reward only embeds
  generated faces). `embedder` says which embedder made them, so a trainer can refuse a mismatch.
- The schema is strict: unknown keys and wrong types are errors naming the file and the field. Every write
  and every read validates; writes are atomic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from umo.io import atomic_write_json, save_safetensors

SCHEMA = "umo.samples"
VERSION = 1
SOURCES = ("real", "synthetic")


class ManifestError(ValueError):
    """A manifest or its embeddings file does not follow the schema; the message names file and field."""


@dataclass(frozen=True)
class Reference:
    identity: str
    path: str


@dataclass(frozen=True)
class Sample:
    id: str
    group: str
    prompt: str
    target: str
    references: tuple[Reference, ...]
    source: str = "real"


@dataclass
class Manifest:
    split: str
    samples: list[Sample]
    embeddings: str = "reference_embeddings.safetensors"
    embedder: dict[str, str] = field(default_factory=dict)
    toy_world: bool = False
    root: Path = Path(".")
    """The folder the relative paths resolve under (the manifest file's folder); not serialized."""

    def path(self, rel: str) -> Path:
        """The file `rel` names, confined to the manifest's folder after resolving symlinks: a link inside it
        that leads out (say, in references/) is refused, not followed."""
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ManifestError(f"{self.root}: {rel!r} resolves to {path}, outside the manifest's folder")
        return path

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "version": VERSION, "split": self.split, "toy_world": self.toy_world,
                "embeddings": self.embeddings, "embedder": dict(self.embedder),
                "samples": [{"id": s.id, "group": s.group, "source": s.source, "prompt": s.prompt,
                             "target": s.target,
                             "references": [{"identity": r.identity, "path": r.path} for r in s.references]}
                            for s in self.samples]}


# ---------------------------------------------------------------------------------------------- validation

_TOP = {"schema": str, "version": int, "split": str, "toy_world": bool, "embeddings": str, "embedder": dict,
        "samples": list}
MAX_PROMPT_CHARS = 20_000
_SAMPLE = {"id": str, "group": str, "source": str, "prompt": str, "target": str, "references": list}
_REFERENCE = {"identity": str, "path": str}


def _check_keys(obj: Any, spec: dict[str, type], where: str, file: str) -> None:
    if not isinstance(obj, dict):
        raise ManifestError(f"{file}: {where}: expected an object, got {type(obj).__name__}")
    unknown, missing = set(obj) - set(spec), set(spec) - set(obj)
    if unknown or missing:
        raise ManifestError(f"{file}: {where}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    for key, tp in spec.items():
        if not isinstance(obj[key], tp) or (tp is int and isinstance(obj[key], bool)):
            raise ManifestError(f"{file}: {where}.{key}: expected {tp.__name__}, got {obj[key]!r}")


def check_relative(rel: str, where: str, file: str) -> None:
    """A path inside the manifest's folder: relative, POSIX, no `..`, not empty."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel or rel.startswith("~"):
        raise ManifestError(f"{file}: {where}: {rel!r} must be a relative path inside the manifest's folder")


def parse_manifest(data: Any, *, root: Path, file: str = "<manifest>") -> Manifest:
    """Validate plain data (a loaded JSON) and build a `Manifest`."""
    _check_keys(data, _TOP, "<top level>", file)
    if data["schema"] != SCHEMA or data["version"] != VERSION:
        raise ManifestError(f"{file}: schema {data['schema']!r} version {data['version']}: this umo reads "
                            f"{SCHEMA!r} version {VERSION}; re-run `umo prepare`")
    check_relative(data["embeddings"], "embeddings", file)
    samples, seen = [], set()
    for i, s in enumerate(data["samples"]):
        where = f"samples[{i}]"
        _check_keys(s, _SAMPLE, where, file)
        if not s["id"] or s["id"] in seen:
            raise ManifestError(f"{file}: {where}.id: {s['id']!r} is empty or not unique")
        seen.add(s["id"])
        if s["source"] not in SOURCES:
            raise ManifestError(f"{file}: {where}.source: expected one of {SOURCES}, got {s['source']!r}")
        if not s["prompt"].strip():
            raise ManifestError(f"{file}: {where}.prompt: empty")
        if len(s["prompt"]) > MAX_PROMPT_CHARS:  # a manifest another tool wrote: never a 100 MB tokenizer input
            raise ManifestError(f"{file}: {where}.prompt: {len(s['prompt'])} characters, more than "
                                f"{MAX_PROMPT_CHARS} (umo prepare cuts captions at prepare.max_caption_chars)")
        check_relative(s["target"], f"{where}.target", file)
        if not s["references"]:
            raise ManifestError(f"{file}: {where}.references: a sample needs at least one reference")
        refs = []
        for j, r in enumerate(s["references"]):
            _check_keys(r, _REFERENCE, f"{where}.references[{j}]", file)
            check_relative(r["path"], f"{where}.references[{j}].path", file)
            if r["path"] == s["target"]:
                raise ManifestError(f"{file}: {where}.references[{j}]: the target image may not be a reference")
            refs.append(Reference(r["identity"], r["path"]))
        if len({r.identity for r in refs}) != len(refs):
            raise ManifestError(f"{file}: {where}.references: an identity appears twice")
        samples.append(Sample(s["id"], s["group"], s["prompt"], s["target"], tuple(refs), s["source"]))
    embedder = {str(k): str(v) for k, v in data["embedder"].items()}
    return Manifest(data["split"], samples, data["embeddings"], embedder, data["toy_world"], root)


def read_manifest(path: str | Path, *, check_files: bool = True) -> Manifest:
    """Read and validate a manifest; with check_files, every file it names must exist."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found (run `umo prepare`)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: not valid JSON: {err}") from err
    manifest = parse_manifest(data, root=path.parent, file=str(path))
    if check_files:
        names = [manifest.embeddings] + [rel for s in manifest.samples for rel in (s.target, *(r.path for r in s.references))]
        try:
            missing = [rel for rel in dict.fromkeys(names) if not manifest.path(rel).is_file()]
        except ManifestError as err:  # a symlink out of the folder: name the manifest, not only its folder
            raise ManifestError(f"{path}: {err}") from None
        if missing:
            raise ManifestError(f"{path}: {len(missing)} files it names do not exist under {path.parent}, "
                                f"first: {missing[:3]}")
    return manifest


def write_manifest(manifest: Manifest, path: str | Path, embeddings: dict[str, torch.Tensor] | None = None) -> Path:
    """Validate and write the manifest atomically; with `embeddings`, write (and check) its embeddings file
    first, so the manifest never names a file that is not complete."""
    path = Path(path)
    data = manifest.to_dict()
    parse_manifest(data, root=path.parent, file=str(path))
    if embeddings is not None:
        check_embeddings(manifest, embeddings, file=str(path.parent / manifest.embeddings))
        save_safetensors(embeddings, path.parent / manifest.embeddings,
                         {"schema": SCHEMA, "version": VERSION, **manifest.embedder})
    atomic_write_json(path, data)
    return path


def check_embeddings(manifest: Manifest, embeddings: dict[str, torch.Tensor], *, file: str) -> None:
    """One (M, D) finite, unit-norm tensor per sample, M = its number of references, one D for all."""
    ids = {s.id for s in manifest.samples}
    if set(embeddings) != ids:
        extra, missing = sorted(set(embeddings) - ids), sorted(ids - set(embeddings))
        raise ManifestError(f"{file}: sample ids do not match the manifest: extra {extra[:3]}, missing {missing[:3]}")
    dims = set()
    for s in manifest.samples:
        e = embeddings[s.id]
        if e.ndim != 2 or e.shape[0] != len(s.references):
            raise ManifestError(f"{file}: {s.id}: expected ({len(s.references)}, D), got {tuple(e.shape)}")
        if not torch.isfinite(e).all() or not torch.allclose(e.float().norm(dim=1), torch.ones(len(e)), atol=1e-3):
            raise ManifestError(f"{file}: {s.id}: embeddings must be finite and L2-normalized")
        dims.add(e.shape[1])
    if len(dims) > 1:
        raise ManifestError(f"{file}: embeddings have several sizes {sorted(dims)}")


def load_embeddings(manifest: Manifest) -> dict[str, torch.Tensor]:
    """The manifest's reference embeddings {sample id: (M, D) float32}, validated."""
    file = manifest.path(manifest.embeddings)
    try:
        embeddings = {k: v.float() for k, v in load_file(str(file)).items()}
    except (OSError, SafetensorError) as err:
        raise ManifestError(f"{file}: cannot read the reference embeddings: {err}") from err
    check_embeddings(manifest, embeddings, file=str(file))
    return embeddings
