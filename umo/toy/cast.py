"""The toy world's BASE generator: the stand-in for a pretrained customization model.

`umo toybase build --out artifacts/toybase` makes a FLUX.2 [klein] diffusers folder that draws the people of
its references with identity, and confuses them measurably, so that the chain's fine-tuning and evaluation have
something to move. The design follows a measured probe (docs/ablation.md, Design):

- a CAST of 16 identities that the face models never saw (`toybase.photos.cast`, held out of the toy world's
  training identities);
- 2-person photos in fixed slots: reference k stands in slot k, so no slot's flow-matching target is a mix of two
  people; each photo is an 80 x 128 strip around the heads (fewer tokens, the same faces);
- confusion put into the training data the paper's way: with `duplicate_p`, a photo shows one of the two people
  twice and the other not at all, while its references stay the two people;
- an 8x VAE trained on the cast's photos alone (its decoder carries the faces' detail, the transformer works on
  40 image tokens), then the transformer trained from scratch with flow matching (`umo.toy.base`).

Then the GATE: on held-out photos of the cast (new poses, light, expressions and reference portraits), the
judge must find 2 faces in at least `min_two_face_rate` of the generated images, ID-Sim must reach
`min_id_sim`, and ID-Conf must lie inside `id_conf`. A base that fails is refused ("uninformative base", with
the numbers): nothing is fine-tuned from it.

The folder, each step cached under a key of exactly what it depends on (its settings, the previous step's key,
the sources that shape its bytes, the face models' sha256), so a changed model setting keeps the photos and the
VAE, and the face models never rebuild for it:

    photos/        train.json, test.json (+ reference embeddings of the REWARD embedder), targets/, references/
    vae/           the trained AutoencoderKLFlux2
    generator/     the base: a Flux2KleinKVPipeline folder (safetensors), what `generator.path` points at
    gate.json      the gate's numbers and decision
    toybase_build.json   written last: the keys, the gate, the timings
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinKVPipeline
from PIL import Image

from umo.config import Config, apply_override, config_from_dict, to_dict
from umo.data.manifest import Manifest, Reference, Sample, write_manifest
from umo.eval.run import load_items, read_scores, score_models
from umo.eval.score import Judge, aggregate, score_item
from umo.images import load_image, read_rgb, rgb_to_signed, signed_to_rgb
from umo.io import atomic_dir, atomic_write_json, sha256_file
from umo.models import TRAINED_WITH
from umo.models.flux2 import Flux2KleinGenerator
from umo.reward import MatchingReward
from umo.toy.base import (
    _load_signed,
    _reference_crop,
    new_components,
    save_base,
    set_latent_statistics,
    train_base,
    train_vae,
)
from umo.toy.config import ToyBaseConfig, ToyCastPhotosConfig
from umo.toy.tiny.flux2 import TINY_TEXT_LAYERS
from umo.toy.world.build import load_toyworld
from umo.toy.world.identity import make_identity
from umo.toy.world.render import head_strip, render_group, render_portrait

log = logging.getLogger(__name__)

MANIFEST_FILE = "toybase_build.json"
GATE_FILE = "gate.json"
PHOTOS_FORMAT = 2  # bump when what `write_photos` writes changes (its toy-world sources are hashed in the key)
PROMPT = "a group photo of two people"  # render_group's caption, as the photo sessions of data/ carry it


class UninformativeBase(RuntimeError):
    """The base did not pass its gate: fine-tuning it could not show anything."""


# ------------------------------------------------------------------------------------------------ photos


def render_cast_photo(world_seed: int, pair: tuple[int, int], seed: int, cfg: ToyCastPhotosConfig,
                      image_size: tuple[int, int], *, duplicate: int | None = None):
    """One photo: (target (height, width, 3) uint8, [2 reference crops (reference_size^2, 3)]).

    pair: the two identity ids, reference k = slot k. image_size: the collection's [height, width] (a width
    render cut to the head strip). duplicate: None, or the index (0/1) of the person drawn in BOTH slots (the
    other one is missing from the photo, not from the references).
    """
    rng = np.random.default_rng([cfg.seed, seed])
    people = [make_identity(world_seed, int(i)) for i in pair]
    drawn = people if duplicate is None else [people[duplicate]] * 2
    scene = head_strip(render_group(world_seed, drawn, rng, image_size[1], shuffle=False,
                                    repeats=duplicate is not None), image_size[0])
    refs = []
    for person in people:
        portrait = render_portrait(person, rng, (128, 128))
        refs.append(_reference_crop(portrait.image, portrait.boxes[0], cfg.crop_scale, cfg.reference_size))
    return scene.image, refs


def _render_chunk(args: tuple[int, list[tuple[str, tuple[int, int], int, int | None]], dict[str, Any], str,
                            tuple[int, int]]) -> int:
    world_seed, jobs, cfg_data, out, image_size = args

    torch.set_num_threads(1)
    cfg = ToyCastPhotosConfig(**cfg_data)
    for sample_id, pair, seed, duplicate in jobs:
        image, refs = render_cast_photo(world_seed, pair, seed, cfg, image_size, duplicate=duplicate)
        Image.fromarray(image).save(Path(out) / "targets" / f"{sample_id}.png", compress_level=1)
        for k, ref in enumerate(refs):
            Image.fromarray(ref).save(Path(out) / "references" / f"{sample_id}-r{k}.png", compress_level=1)
    return len(jobs)


def photo_plan(cfg: ToyCastPhotosConfig, cast: tuple[int, int]) -> dict[str, list[tuple[str, tuple[int, int], int,
                                                                                          int | None]]]:
    """Per split, each photo's (id, (person in slot 0, person in slot 1), render seed, duplicated index or None).
    Test photos never duplicate: they are what the base is asked to draw; their people are `cfg.test_cast`'s
    when it is set (the open-set variant), else the cast's."""
    rng = np.random.default_rng([cfg.seed, 19])
    people = {"train": np.arange(*cast), "test": np.arange(*(cfg.test_cast or cast))}
    plan = {}
    for split, n in (("train", cfg.n_train), ("test", cfg.n_test)):
        rows = []
        for i in range(n):
            a, b = (int(v) for v in rng.choice(people[split], 2, replace=False))
            dup = int(rng.integers(2)) if split == "train" and rng.random() < cfg.duplicate_p else None
            rows.append((f"{split}-{i:05d}", (a, b), int(rng.integers(0, 2**31 - 1)), dup))
        plan[split] = rows
    return plan


def write_photos(out: Path, cfg: ToyCastPhotosConfig, *, world_seed: int, cast: tuple[int, int],
                 image_size: tuple[int, int], reward, embedder_path: str | Path, workers: int = 2) -> dict[str, Any]:
    """train.json and test.json (the `umo.samples` manifest format, reference embeddings by the REWARD
    embedder) of the cast's photos into `out`, atomically; returns stats. A reference in which the reward's
    detector finds no face drops its photo (counted)."""
    started = time.perf_counter()
    plan = photo_plan(cfg, cast)
    stats: dict[str, Any] = {"dropped_no_reference_face": 0}
    with atomic_dir(out) as tmp:
        (tmp / "targets").mkdir()
        (tmp / "references").mkdir()
        jobs = [row for rows in plan.values() for row in rows]
        chunks = [(world_seed, jobs[i::workers * 4], asdict(cfg), str(tmp), image_size) for i in range(workers * 4)]
        if workers > 1:  # spawned: no fork of a process holding ONNX threads
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                list(pool.map(_render_chunk, chunks))
        else:
            [_render_chunk(c) for c in chunks]
        for split, rows in plan.items():
            samples, embeddings = [], {}
            paths = [f"references/{row[0]}-r{k}.png" for row in rows for k in range(2)]
            found = []
            for i in range(0, len(paths), 128):  # one detector and embedder call per 128 references
                found += reward.embed_references(torch.stack([_load_signed(tmp / p) for p in paths[i:i + 128]]),
                                                 largest_only=True)
            for n, (sample_id, pair, _seed, dup) in enumerate(rows):
                emb = found[2 * n:2 * n + 2]
                paths_n = paths[2 * n:2 * n + 2]
                if any(e.shape[0] != 1 for e in emb):
                    stats["dropped_no_reference_face"] += 1
                    continue
                embeddings[sample_id] = torch.cat(emb).float().contiguous()
                group = "cast-duplicate" if dup is not None else "cast"
                samples.append(Sample(id=sample_id, group=group, prompt=PROMPT,
                                      target=f"targets/{sample_id}.png",
                                      references=tuple(Reference(identity=f"toy/{i:04d}", path=p)
                                                       for i, p in zip(pair, paths_n))))
            manifest = Manifest(split=split, samples=samples, embeddings=f"{split}_embeddings.safetensors",
                                embedder={"path": str(embedder_path), "sha256": sha256_file(embedder_path)},
                                toy_world=True, root=tmp)
            write_manifest(manifest, tmp / f"{split}.json", embeddings)
            stats[f"{split}_photos"] = len(samples)
            stats[f"{split}_duplicates"] = sum(s.group == "cast-duplicate" for s in samples)
        stats["seconds"] = round(time.perf_counter() - started, 1)
        atomic_write_json(tmp / "stats.json", stats)
    log.info("toy base photos: %s", stats)
    return stats


# ------------------------------------------------------------------------------------------------ gate


def base_config(cfg: ToyBaseConfig, root: Path) -> Config:
    """A complete umo Config that reads the built base: generator, eval and faces (the toy world's) settings."""
    world = load_toyworld(cfg.toyworld)
    data = to_dict(Config())
    data["generator"] |= {"family": "flux2_klein", "path": str(root / "generator"), "text_layers": None,
                          "max_sequence_length": cfg.max_sequence_length, "guidance_scale": 1.0,
                          "resolution": list(cast_of(cfg, world)[1]),
                          "reference_resolution": list(cfg.reference_resolution)}
    data["eval"] |= {"benchmark": "heldout", "path": str(root / "photos" / "test.json"),
                     "images_per_item": cfg.gate.images_per_item, "steps": cfg.gate.steps, "seed": 0,
                     "max_items": None}
    for item in world.faces_overrides():
        apply_override(data, item)
    return config_from_dict(data, source="toybase")


def check_gate(metrics: dict[str, Any], cfg: ToyBaseConfig) -> dict[str, Any]:
    """The gate's decision on the base's judged metrics (`umo.eval.score.aggregate`, x100)."""
    g = cfg.gate
    measured = {"two_face_rate": metrics.get("face_count_accuracy"), "id_sim": metrics.get("id_sim"),
                "id_conf": metrics.get("id_conf"), "id_match": metrics.get("id_match"),
                "items": metrics.get("items"), "unscored": metrics.get("unscored")}
    failures = []
    if measured["two_face_rate"] is None or measured["two_face_rate"] < g.min_two_face_rate:
        failures.append(f"2-face rate {measured['two_face_rate']} < {g.min_two_face_rate}")
    if measured["id_sim"] is None or measured["id_sim"] < g.min_id_sim:
        failures.append(f"ID-Sim {measured['id_sim']} < {g.min_id_sim}")
    if g.id_conf is not None and (measured["id_conf"] is None
                                  or not g.id_conf[0] <= measured["id_conf"] <= g.id_conf[1]):
        failures.append(f"ID-Conf {measured['id_conf']} outside [{g.id_conf[0]}, {g.id_conf[1]}]")
    return {"measured": measured, "gate": to_dict(g), "passed": not failures, "failures": failures,
            "chance": {"id_sim": "about 1-9", "id_conf": "about 64 (2 faces)"}}


def judge_photos(config: Config, root: Path, *, vae=None, judge=None) -> dict[str, Any]:
    """The judge on the held-out photos themselves (vae None: the ceiling the base aims at), or on their VAE
    round trip (what the decoder can still show): the gate's metrics, one image per item."""
    judge = judge or Judge.from_config(config.faces)
    items = load_items(config.eval, root / ".judge-photos")
    man_dir = Path(config.eval.path).parent
    scores = []
    for item in items:
        target = load_image(man_dir / "targets" / f"{item.id}.png", config.generator.resolution)
        if vae is not None:
            with torch.no_grad():
                target = vae.decode(vae.encode(target[None]).latent_dist.mode()).sample[0]
        image = signed_to_rgb(target)
        refs = judge.references([read_rgb(p) for p in item.references])[0]
        scores.append(score_item(item.id, refs, [judge.faces([image])[0][1]]))
    return aggregate(scores, 100.0)


def run_gate(cfg: ToyBaseConfig, root: Path, *, models: dict[str, Path | None] | None = None) -> dict[str, Any]:
    """Generate the held-out photos' items with the base (and any LoRA in `models`), judge them, and decide."""
    config = base_config(cfg, root)
    work = root / ".gate.work"
    items = load_items(config.eval, work)
    models = models or {"base": None}
    score_models(config.eval, config.generator, config.faces, items, models, work)
    scores = next(iter(read_scores(work, items, models).values()))  # the gate's judge
    result = {name: aggregate(s, 100.0) for name, s in scores.items()}
    decision = check_gate(result["base"], cfg)
    decision["items"], decision["images_per_item"] = len(items), cfg.gate.images_per_item
    decision["models"] = result
    shutil.rmtree(work, ignore_errors=True)
    return decision


# ------------------------------------------------------------------------------------------------ build


MODEL_CODE = ("models/base.py", "models/flux2.py", "toy/tiny/flux2.py", "train/data.py")  # what the base trains with


def _sources_hash(*names: str) -> str:
    """sha256 of umo/<names> (globs allowed), in name order."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(p for n in names for p in root.glob(n)):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def cast_of(cfg: ToyBaseConfig, world) -> tuple[tuple[int, int], tuple[int, int]]:
    """The cast [first, last) and the photo size [height, width]: the photos' own, else the toy world's."""
    c = world.config
    cast = cfg.photos.cast or c.collection.cast
    if cast is None:
        raise ValueError(f"{cfg.toyworld}: no cast: set toybase.photos.cast or the toy world's collection.cast")
    if not c.n_train_identities <= cast[0] < cast[1] <= c.n_identities:
        raise ValueError(f"toybase cast {cast}: must lie in the toy world's held-out identities "
                         f"[{c.n_train_identities}, {c.n_identities}): the face models never saw the cast")
    test_cast = cfg.photos.test_cast
    if test_cast is not None and not c.n_train_identities <= test_cast[0] < test_cast[1] - 1 < c.n_identities:
        raise ValueError(f"toybase.photos.test_cast {test_cast}: must hold 2 or more of the toy world's held-out "
                         f"identities [{c.n_train_identities}, {c.n_identities})")
    size = cfg.photos.image_size or c.collection.image_size
    if size[0] % 16 or size[1] % 16 or size[1] < 128 or size[0] > size[1]:
        raise ValueError(f"toybase photo size {size}: expected [height, width], multiples of 16, width >= 128, "
                         "height <= width")
    return (int(cast[0]), int(cast[1])), (int(size[0]), int(size[1]))


def step_keys(cfg: ToyBaseConfig, world) -> dict[str, str]:
    """Each step's cache key: what its bytes depend on, chained (a changed photo setting changes every key)."""
    faces = {"reward": world.reward_path, "judge": world.judge_path, "detector": world.detector_path}

    c = to_dict(cfg)
    cast, size = cast_of(cfg, world)
    photos = {"photos": c["photos"], "format": PHOTOS_FORMAT, "world_seed": world.config.world_seed, "cast": cast,
              "image_size": size, "src": _sources_hash("toy/world/*.py"), "torch": torch.__version__,
              "faces": {k: sha256_file(v) for k, v in faces.items()}}
    # The code each step runs, not all of umo/models: a LoRA or loader change must not retrain the base.
    trainer = _sources_hash("toy/base.py", *MODEL_CODE)
    # The VAE's key: only the code that trains it (a transformer change keeps the VAE).
    vae_code = hashlib.sha256("".join(inspect.getsource(f) for f in (
        new_components, _load_signed, rgb_to_signed, read_rgb, train_vae, set_latent_statistics)).encode())

    def key(*parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    keys = {"photos": key(photos)}
    keys["vae"] = key(keys["photos"], c["vae"], vae_code.hexdigest(), _sources_hash(*MODEL_CODE))
    keys["generator"] = key(keys["vae"], c["model"], c["reference_resolution"], c["sampler_steps"],
                            c["max_sequence_length"], trainer)
    keys["gate"] = key(keys["generator"], c["gate"], _sources_hash("eval/*.py", "faces/*.py", "metrics.py"))
    return keys


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST_FILE
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        log.warning("%s is not valid JSON: rebuilding the toy base", path)
        data = {}
    return data if isinstance(data, dict) else {}


def build_toybase(cfg: ToyBaseConfig, *, out: str | Path | None = None, force: bool = False,
                  workers: int = 2, device: str = "cpu") -> dict[str, Any]:
    """Build (or reuse) the toy base in `out` (default cfg.out); see the module docstring. Returns the build
    manifest. Raises UninformativeBase (after recording it) when the base fails its gate. device: where the VAE
    and the transformer train (a GPU: `--device cuda`); the gate's evaluation picks the GPU when there is one."""
    started = time.perf_counter()
    root = Path(out or cfg.out).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    world = load_toyworld(cfg.toyworld)
    cast, image_size = cast_of(cfg, world)
    keys = step_keys(cfg, world)
    old = {} if force else _read_manifest(root)
    steps: dict[str, Any] = {}
    seconds: dict[str, float] = {}

    def reuse(name: str) -> bool:
        entry = old.get("steps", {}).get(name, {})
        ok = entry.get("key") == keys[name] and (root / name).is_dir()
        if ok:
            steps[name] = entry
            log.info("toy base: %s reused (%s)", name, root / name)
        return ok

    if not reuse("photos"):
        t0 = time.perf_counter()
        config = base_config(cfg, root)
        reward = MatchingReward.from_config(config.faces, config.reward)
        stats = write_photos(root / "photos", cfg.photos, world_seed=world.config.world_seed, cast=tuple(cast),
                             image_size=image_size, reward=reward, embedder_path=config.faces.embedder.path,
                             workers=workers)
        seconds["photos"] = time.perf_counter() - t0
        steps["photos"] = {"key": keys["photos"], "stats": stats, "seconds": round(seconds["photos"], 1)}
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if not reuse("vae"):
        t0 = time.perf_counter()
        vae = new_components(cfg.vae, cfg.model)["vae"].to(device)
        info = train_vae(vae, root / "photos" / "train.json", cfg.vae)
        vae.to("cpu")
        with atomic_dir(root / "vae") as tmp:
            vae.save_pretrained(tmp, safe_serialization=True)
        config = base_config(cfg, root)
        info["photos_judged"] = judge_photos(config, root)
        info["round_trip_judged"] = judge_photos(config, root, vae=vae)
        log.info("toy base VAE: the judge on held-out photos %s, on their round trip %s",
                 _short(info["photos_judged"]), _short(info["round_trip_judged"]))
        seconds["vae"] = time.perf_counter() - t0
        steps["vae"] = {"key": keys["vae"], "metrics": info, "seconds": round(seconds["vae"], 1)}
    if not reuse("generator"):
        t0 = time.perf_counter()
        parts = new_components(cfg.vae, cfg.model)
        parts["vae"] = AutoencoderKLFlux2.from_pretrained(root / "vae", local_files_only=True,
                                                          use_safetensors=True).eval()
        gen = Flux2KleinGenerator(Flux2KleinKVPipeline(**parts, is_distilled=False).to(device),
                                  text_layers=TINY_TEXT_LAYERS, max_sequence_length=cfg.max_sequence_length)
        info = train_base(gen, root / "photos" / "train.json", cfg.model, resolution=image_size,
                          reference_resolution=tuple(cfg.reference_resolution), sampler_steps=cfg.sampler_steps)
        gen.pipe.to("cpu")
        save_base(gen, root / "generator", {**info, "toy": True, "cast": cast, "resolution": list(image_size),
                                            "vae": steps["vae"].get("metrics", {})})
        seconds["generator"] = time.perf_counter() - t0
        steps["generator"] = {"key": keys["generator"], "metrics": info, "seconds": round(seconds["generator"], 1)}
    # What the chain's generator settings must equal (umo.models.check_trained_with); written on every build, so a
    # base cached before the record existed gets it too (its values are part of the generator's key).
    atomic_write_json(root / "generator" / TRAINED_WITH, {
        "resolution": list(image_size), "reference_resolution": list(cfg.reference_resolution),
        "max_sequence_length": cfg.max_sequence_length})
    gate = old.get("gate") if old.get("gate_key") == keys["gate"] and "generator" not in seconds else None
    if gate is None:
        t0 = time.perf_counter()
        gate = run_gate(cfg, root)
        seconds["gate"] = time.perf_counter() - t0
        gate["seconds"] = round(seconds["gate"], 1)
    atomic_write_json(root / GATE_FILE, gate)
    manifest = {"world": "toy", "config": to_dict(cfg), "steps": steps, "gate_key": keys["gate"], "gate": gate,
                "seconds": {k: round(v, 1) for k, v in seconds.items()}  # this call's; each step keeps its own
                | {"total": round(time.perf_counter() - started, 1)}}
    atomic_write_json(root / MANIFEST_FILE, manifest)  # the pointer: written last
    log.info("toy base gate: %s", gate_table(gate))
    if not gate["passed"]:
        raise UninformativeBase(f"{root}: uninformative base: {'; '.join(gate['failures'])} "
                                f"(measured {gate['measured']})")
    return manifest


def _short(m: dict[str, Any]) -> str:
    return (f"2-face rate {m.get('face_count_accuracy')}, ID-Sim {m.get('id_sim')}, ID-Conf {m.get('id_conf')}, "
            f"ID-Match {m.get('id_match')} ({m.get('items')} items)")


def gate_table(gate: dict[str, Any]) -> str:
    """The gate as a few readable lines."""
    m, g = gate["measured"], gate["gate"]
    return "\n".join([
        f"toy base gate ({gate.get('items')} held-out cast photos x {gate.get('images_per_item')} images): "
        + ("PASSED" if gate["passed"] else "REFUSED: uninformative base"),
        f"  2-face rate {m['two_face_rate']} (>= {g['min_two_face_rate']})",
        f"  ID-Sim {m['id_sim']} (>= {g['min_id_sim']}; chance about 1-9)",
        f"  ID-Conf {m['id_conf']} (in {g['id_conf']}; chance about 64)",
        f"  ID-Match {m['id_match']}",
    ])
