"""Atomic file writes: readers see the old file (or folder) or the new one, never half of one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def shared_path(path: str | Path) -> Path:
    """A path to state that a project shares between its workspaces (the default MLflow store, a local
    deployment folder): a relative one is resolved against $DVC_ROOT, the checkout that DVC runs the stage for
    (an experiment's workspace sets it to the checkout, as `dvc exp run`'s queue does), else the working folder.

    >>> os.environ["DVC_ROOT"] = "/srv/umo"; str(shared_path("artifacts/deploy")), str(shared_path("/abs"))
    ('/srv/umo/artifacts/deploy', '/abs')
    >>> del os.environ["DVC_ROOT"]
    """
    path = Path(path)
    root = os.environ.get("DVC_ROOT")
    return path if path.is_absolute() or not root else Path(root) / path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to a hidden temporary sibling, then rename it over `path` (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """`obj` as indented JSON with sorted keys (stable bytes for DVC), written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_safetensors(tensors: Mapping[str, Any], path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write torch tensors as safetensors, atomically.

    `metadata` goes into the header as ONE entry, "umo" = its JSON with sorted keys: safetensors keeps header
    metadata in a hash map whose order changes from process to process, so several entries would make the
    bytes of identical files differ.
    """
    from safetensors.torch import save_file  # lazy: umo.config imports umo.io, and settings need no torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    header = {"umo": json.dumps(dict(metadata), sort_keys=True)} if metadata else None
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=header)
    os.replace(tmp, path)
    return path


def canonical_safetensors(path: str | Path) -> Path:
    """Rewrite a safetensors file's header as JSON with sorted keys, in place and atomically, so that the same
    tensors and metadata always give the same bytes. Writers that put several entries in the header's metadata
    (diffusers' LoRA files: "format" and the adapter config) get them in a per-process random order. The tensor
    data is untouched: its offsets are relative to the end of the header, which stays 8-byte aligned."""
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) < 8:
        raise ValueError(f"{path}: not a safetensors file ({len(raw)} bytes)")
    (size,) = struct.unpack("<Q", raw[:8])
    if size > len(raw) - 8:
        raise ValueError(f"{path}: not a safetensors file (header of {size} bytes in a {len(raw)}-byte file)")
    try:
        header = json.loads(raw[8:8 + size])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a safetensors file (header is not JSON: {e})") from e
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    atomic_write_bytes(path, struct.pack("<Q", len(text)) + text + raw[8 + size:])
    return path


def read_safetensors_metadata(path: str | Path) -> dict[str, Any]:
    """The "umo" header entry written by `save_safetensors` ({} when there is none)."""
    from safetensors import safe_open  # lazy: as above

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta["umo"]) if "umo" in meta else {}


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces `path` in one rename.

    On an exception the temporary folder is removed and `path` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    return _file_digest(path, hashlib.sha256(), chunk)


def md5_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The file's md5: DVC's hash of a file (what dvc.lock records for it)."""
    return _file_digest(path, hashlib.md5(), chunk)


def _file_digest(path: str | Path, h, chunk: int) -> str:
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dvc_dir_md5(folder: str | Path) -> str:
    """DVC's hash of a folder (`<md5>.dir`: the md5 of its sorted [{"md5", "relpath"}] listing, as DVC 3 writes
    it in dvc.lock)."""
    folder = Path(folder)
    entries = sorted(({"md5": md5_file(f), "relpath": f.relative_to(folder).as_posix()}
                      for f in folder.rglob("*") if f.is_file()), key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def dataset_record(name: str, path: str | Path, *, items: int) -> dict[str, Any]:
    """What identifies a data set for lineage: name, path, digest (DVC's hash: a file's md5, a folder's
    `dvc_dir_md5`; at most 36 characters, MLflow's limit for a dataset digest) and number of items."""
    path = Path(path)
    digest = dvc_dir_md5(path) if path.is_dir() else md5_file(path)
    return {"name": name, "path": str(path), "digest": digest, "items": items}


TOY_WORLD_FILE = "toyworld.json"
"""What synthetic artifacts write about themselves ({"toy_world": true, ...}): a raw collection, a face-model pack.
The product reads it (`is_toy_world`) to label manifests and reports as synthetic; it never imports the toy world."""


def is_toy_world(folder: str | Path) -> bool:
    """True when `folder` holds TOY_WORLD_FILE saying "toy_world": true; False when absent or unreadable."""
    try:
        return json.loads((Path(folder) / TOY_WORLD_FILE).read_text()).get("toy_world") is True
    except (OSError, ValueError, AttributeError):
        return False

