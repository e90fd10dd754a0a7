"""`umo generate`: images from a prompt and reference images with a LoRA, found where a team keeps it.

`--lora` names it in one of four ways (`resolve`):
- a path: a LoRA file, or a folder holding one (a training run's `lora/`); with a config.json beside it (a
  package: a registered or deployed version's files) its serving settings are used, else params.yaml's;
- a registry alias of registry.model_name (`champion`, `challenger`, `previous`), or `models:/<name>@<alias>`,
  `models:/<name>/<version>`: the version's files, downloaded;
- `deployed` (deploy.target) or `s3://bucket/prefix`, or a local deployment folder: the version current.json
  points at, its manifest checked against the pointer, each file read once and checked against the manifest.

Generation itself is umo.serve's LoraGenerator: the code the registered MLflow model runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from umo.io import atomic_dir, sha256_file
from umo.package import LORA_FILE, SETTINGS_FILE, GenerationError, ServeSettings, lora_file, serve_settings
from umo.serve import LoraGenerator, Reference

log = logging.getLogger(__name__)

ALIASES = ("champion", "challenger", "previous")


@dataclass
class Resolved:
    lora: Path
    settings: ServeSettings
    source: str  # what --lora named, as a person reads it (e.g. "umo-lora version 4 (champion)")


def resolve(spec: str, config, work: Path) -> Resolved:
    """The LoRA and its serving settings that `spec` names (see the module docstring); files that must be fetched
    go into `work`. GenerationError when it names nothing."""
    name = config.registry.model_name
    registry = re.fullmatch(r"models:/([^/@]+)(?:@([\w-]+)|/(\d+))", spec)
    if spec in ALIASES or registry:
        model, alias, version = (name, spec, None) if spec in ALIASES else registry.groups()
        return _from_registry(config, model, alias, version, work)
    if spec == "deployed" or spec.startswith("s3://"):
        return _from_deployment(config, name, None if spec == "deployed" else spec, work)
    path = Path(spec)
    if (path / name / "current.json").is_file():  # a local deployment folder
        return _from_deployment(config, name, str(path), work)
    if not path.exists():
        raise GenerationError(f"--lora {spec}: no such file or folder, and not a registry alias ({', '.join(ALIASES)}, "
                              "models:/<name>@<alias>, models:/<name>/<version>) nor a deployment (deployed, "
                              "s3://bucket/prefix)")
    folder = path if path.is_dir() else path.parent
    settings = (ServeSettings.read(folder / SETTINGS_FILE) if (folder / SETTINGS_FILE).is_file()
                else serve_settings(config))
    return Resolved(lora_file(path), settings, str(path))


def _from_registry(config, model: str, alias: str | None, version: str | None, work: Path) -> Resolved:
    # lazy: MLflow loads only when the registry is asked
    from umo.registry import client_for, version_files

    client = client_for(config.tracking)
    try:
        mv = client.get_model_version_by_alias(model, alias) if alias else client.get_model_version(model, version)
    except Exception as err:  # MLflow's RestException / MlflowException: not found, or the server is away
        which = f"alias `{alias}`" if alias else f"version {version}"
        raise GenerationError(f"registry model {model}: no {which} ({type(err).__name__}: {err})") from err
    files = version_files(client, model, mv.version, work)
    label = f"{model} version {mv.version}" + (f" ({alias})" if alias else "")
    return Resolved(files["lora"], ServeSettings.read(files["config"]), label)


def _from_deployment(config, name: str, target: str | None, work: Path) -> Resolved:
    """The version current.json points at: its manifest checked against the pointer, then each file read once
    and checked against the manifest (the checks of `umo deploy --verify`, without reading every file twice)."""
    # lazy: boto3 loads only when a deployment is asked
    from umo.deploy import parse_target, read_pointer

    store = parse_target(target or config.deploy.target, config.deploy)
    pointer = read_pointer(store, name)
    if not pointer:
        raise GenerationError(f"{store.location}/{name}/current.json: nothing deployed")
    where = f"{store.location}/{pointer['path']}"
    raw = store.read(pointer["manifest"]) or b""
    if hashlib.sha256(raw).hexdigest() != pointer.get("manifest_sha256"):
        raise GenerationError(f"{store.location}/{pointer['manifest']}: not the manifest current.json was written for")
    folder = work / f"{name}-{pointer['version']}"
    folder.mkdir(parents=True, exist_ok=True)
    for file, meta in sorted(json.loads(raw).get("files", {}).items()):
        if "/" in file or file.startswith("."):
            raise GenerationError(f"{store.location}/{pointer['manifest']}: file name {file!r} is not a plain name")
        data = store.read(f"{pointer['path']}/{file}") or b""
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise GenerationError(f"{where}/{file}: not the file deployed (its sha256 differs from the manifest)")
        (folder / file).write_bytes(data)
    if not (folder / LORA_FILE).is_file() or not (folder / SETTINGS_FILE).is_file():
        raise GenerationError(f"{where}: version {pointer['version']} lacks {LORA_FILE} or {SETTINGS_FILE}")
    return Resolved(folder / LORA_FILE, ServeSettings.read(folder / SETTINGS_FILE),
                    f"{name} version {pointer['version']} deployed at {store.location}")


def generate(config, *, lora: str, prompt: str, references: list[Path], out: Path, seeds: list[int]) -> dict:
    """Write len(seeds) images (out/<k>.png) and out/generation.json (what made them) for `prompt` with the
    people of `references`, with the LoRA `lora` names (`resolve`). The folder appears whole, or not at all."""
    with tempfile.TemporaryDirectory(prefix="umo-generate-") as tmp:
        found = resolve(lora, config, Path(tmp))
        log.info("LoRA: %s", found.source)
        generator = LoraGenerator(found.settings, found.lora)
        refs = [Reference(str(p), Path(p)) for p in references]
        images = generator.generate(prompt, refs, seeds=seeds)
        record = {"prompt": prompt, "references": [str(p) for p in references], "seeds": seeds,
                  "lora": {"source": found.source, "sha256": sha256_file(found.lora)},
                  "steps": found.settings.steps, "images": [f"{k}.png" for k in range(len(images))]}
    with atomic_dir(out) as folder:
        for k, image in enumerate(images):
            Image.fromarray(image).save(folder / f"{k}.png")
        (folder / "generation.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
