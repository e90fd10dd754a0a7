"""Evaluation sets: what to generate (prompt + reference images) and which references are people to score.

- `heldout`: our test manifest (umo.samples): every reference is a person, and the sample's target image is
  the ground truth (Sim(GT) and copy-paste are measured against it).
- `xverse`: the XVerseBench JSON format: a list of {index, prompt, modulation: [{src_inputs: [{image_path,
  caption}]}]}; every src_input conditions the generator, and the ones stored under a folder named `human`
  are the identities scored.
- `omnicontext`: the OmniContext dataset as the Hugging Face hub stores it, copied to local disk: parquet files
  with key, task_type, instruction and input_images (image structs {bytes, path}). Items whose task_type names
  a `character` are scored; their input images are the candidate identities (the scorer takes each one's
  largest face; an input with no face is counted, not scored). Embedded image bytes are written once to
  `extract_to` (image files named by key), so generation and scoring read plain files.

Paths in a benchmark file are resolved under the benchmark's root (the JSON file's folder unless given) and
may not leave it (absolute paths, `..` or symlinks pointing out are errors naming the file and the item).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from umo.data.manifest import read_manifest
from umo.io import atomic_write_bytes


class EvalSetError(ValueError):
    """A benchmark file that does not follow its format; the message names the file and the item."""


@dataclass(frozen=True)
class EvalItem:
    id: str
    prompt: str
    references: tuple[Path, ...]  # every conditioning image, in order
    identities: tuple[int, ...]  # indices into `references` of the people to score
    target: Path | None = None  # the ground-truth image where the set has one (held-out): Sim(GT), copy-paste

    @property
    def n_identities(self) -> int:
        return len(self.identities)


def file_stem(item_id: str) -> str:
    """A file name for an item id (ids may hold any character): readable, and unique through a short hash.

    >>> file_stem("12"), file_stem("a/b c")
    ('12', 'a_b_c-0af99a60')
    """
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", item_id)[:80]
    return safe if safe == item_id else f"{safe}-{hashlib.sha256(item_id.encode()).hexdigest()[:8]}"


def _confined(root: Path, rel: str, file: Path, where: str) -> Path:
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
        raise EvalSetError(f"{file}: {where}: {rel!r} must be a relative path under {root}")
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise EvalSetError(f"{file}: {where}: {rel!r} leaves the benchmark root {root}")
    if not path.is_file():
        raise EvalSetError(f"{file}: {where}: {rel!r} not found under {root}")
    return path


def load_heldout(manifest: str | Path) -> list[EvalItem]:
    """Our held-out manifest (validated by umo.data.manifest)."""
    m = read_manifest(manifest)
    return [EvalItem(s.id, s.prompt, tuple(m.path(r.path) for r in s.references), tuple(range(len(s.references))),
                     m.path(s.target)) for s in m.samples]


def load_xverse(file: str | Path, root: str | Path | None = None, *, left_out: Counter | None = None) -> list[EvalItem]:
    """An XVerseBench JSON file (single or multi); items without a human reference have nothing to score and
    are left out, counted in `left_out` ("no_human_reference") when given."""
    file = Path(file)
    root = Path(root) if root is not None else file.parent
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise EvalSetError(f"{file}: cannot read the XVerseBench JSON: {err}") from err
    if not isinstance(data, list):
        raise EvalSetError(f"{file}: expected a JSON list of items, got {type(data).__name__}")
    items, seen = [], set()
    for n, entry in enumerate(data):
        where = f"item {n}"
        try:
            index, prompt = str(entry["index"]), entry["prompt"]
            inputs = [s for mod in entry["modulation"] for s in mod["src_inputs"]]
            paths = [s["image_path"] for s in inputs]
        except (KeyError, TypeError) as err:
            raise EvalSetError(f"{file}: {where}: expected {{index, prompt, modulation: [{{src_inputs: "
                               f"[{{image_path, caption}}]}}]}}, missing {err}") from err
        if not isinstance(prompt, str) or not prompt.strip():
            raise EvalSetError(f"{file}: {where}: empty prompt")
        if index in seen:
            raise EvalSetError(f"{file}: {where}: index {index} appears twice")
        seen.add(index)
        refs = tuple(_confined(root, p, file, f"{where} ({index})") for p in paths)
        humans = tuple(k for k, p in enumerate(paths) if "human" in Path(p).parent.parts[-1:])
        if humans:
            items.append(EvalItem(index, prompt, refs, humans))
        elif left_out is not None:
            left_out["no_human_reference"] += 1
    return items


def load_omnicontext(root: str | Path, extract_to: str | Path, *, left_out: Counter | None = None) -> list[EvalItem]:
    """Every `*.parquet` under `root` (sorted), in the OmniContext columns; see the module docstring."""
    import pyarrow.parquet as pq  # lazy: only the OmniContext benchmark is parquet

    root, extract_to = Path(root), Path(extract_to)
    files = sorted(root.rglob("*.parquet"))
    if not files:
        raise EvalSetError(f"{root}: no parquet files (expected the OmniContext dataset, e.g. data/*.parquet)")
    extract_to.mkdir(parents=True, exist_ok=True)
    items, seen = [], set()
    for file in files:
        table = pq.read_table(file)
        missing = {"key", "task_type", "instruction", "input_images"} - set(table.column_names)
        if missing:
            raise EvalSetError(f"{file}: missing OmniContext columns {sorted(missing)}")
        for n, row in enumerate(table.to_pylist()):
            where = f"row {n} ({row.get('key')})"
            key, task, prompt = str(row["key"]), str(row["task_type"]), row["instruction"]
            if key in seen or not isinstance(prompt, str) or not prompt.strip() or not row["input_images"]:
                raise EvalSetError(f"{file}: {where}: duplicate key, empty instruction or no input images")
            seen.add(key)
            if "character" not in task:
                if left_out is not None:
                    left_out[f"task_{task}"] += 1
                continue
            refs = tuple(_omni_image(image, root, extract_to / f"{file_stem(key)}_{k}", file, f"{where} image {k}")
                         for k, image in enumerate(row["input_images"]))
            items.append(EvalItem(key, prompt, refs, tuple(range(len(refs)))))
    return items


def _omni_image(image, root: Path, stem: Path, file: Path, where: str) -> Path:
    """An image struct: its bytes written to `stem`.<format> (atomically, once), or its path under `root`."""
    if not isinstance(image, dict):
        raise EvalSetError(f"{file}: {where}: expected an image struct {{bytes, path}}, got {type(image).__name__}")
    data = image.get("bytes")
    if data:
        suffix = ".png" if data[:8] == b"\x89PNG\r\n\x1a\n" else ".jpg" if data[:2] == b"\xff\xd8" else ".img"
        out = stem.with_name(stem.name + suffix)  # not with_suffix: "scene.1_0" would become "scene.png"
        if not out.is_file() or out.read_bytes() != data:
            atomic_write_bytes(out, data)
        return out
    if image.get("path"):
        return _confined(root, image["path"], file, where)
    raise EvalSetError(f"{file}: {where}: image struct with neither bytes nor path")
