"""`umo toyworld build`: the whole toy world in one folder, deterministic, cached and quality-gated.

Layout of the output folder (every name says toy):

    toy_raw/                      raw collection: group folders of PNGs + captions.jsonl, toyworld.json
    toy_raw_truth.jsonl           its ground truth (boxes, landmarks, identities), kept apart
    models/faces/toy_detector/    an insightface-style pack: det_toy_scrfd.onnx (SCRFD layout)
    models/faces/toy_judge/       judge_<arch>.onnx (insightface recognizer): the evaluation judge
    models/faces/toy_judge_mbf/   judge_toy_mbf.onnx: the second judge (another architecture, other people)
    models/faces/arcface_<arch>.safetensors   the reward embedder (arcface_torch state dict)
    toy_quality.json              held-out quality and the gates it was held to
    toyworld_build.json           the manifest, written last: config, cache keys, sha256 of every file

The build has four parts, each run in its own spawned process (two at a time by default): the raw
collection, the detector (train, export, measure), the embedders (train the reward and the judge, save,
measure) and the second judge (train, export, measure; only when configured). When both judges are there,
one more short step in the same processes measures how alike they score the held-out pairs.

Determinism. Every part runs single-threaded with deterministic algorithms, in a pinned numeric
environment (`portable_numerics_env`): ATen kernels at their AVX2 level, oneDNN capped at AVX2, MKL in
conditional-numerical-reproducibility mode for AVX2 and numpy's AVX-512 loops off. Same seed and settings
-> the same bytes, on this machine and (by construction, not verifiable here) on any x86-64 CPU with AVX2
running the same pinned library versions; the versions are part of every cache key.

Cache. A part is reused when the manifest already holds it under the same key (its settings, the world
seed, a hash of the toy-world and face-package sources, library versions and the numeric environment)
and every file it lists still has its recorded sha256. Anything else rebuilds that part only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import platform
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy
import onnx
import safetensors
import torch

from umo import __version__
from umo.config import to_dict
from umo.faces.detect import FaceDetector
from umo.io import TOY_WORLD_FILE, atomic_write_bytes, sha256_file
from umo.toy.config import ToyWorldConfig
from umo.toy.world.collection import write_raw_collection
from umo.toy.world.detector import DETECTOR_FILE, build_detector, evaluate_detector
from umo.toy.world.embedders import build_embedders, build_second_judge, judge_file, judges_agreement, reward_file
from umo.typed import from_dict

log = logging.getLogger(__name__)

NOTICE = ("TOY WORLD: synthetic cartoon identities and small face models trained on them. Not real people, "
          "not real face models; for offline runs and tests only.")
TOY_METADATA = {"umo.world": "toy", "umo.notice": NOTICE}
MANIFEST_FILE = "toyworld_build.json"
QUALITY_FILE = "toy_quality.json"
RAW_DIR = "toy_raw"
TRUTH_FILE = "toy_raw_truth.jsonl"
MODELS_DIR = "models/faces"
DETECTOR_PACK = "toy_detector"
JUDGE_PACK = "toy_judge"
FORMAT_VERSION = 1
PARTS = ("embedders", "second_judge", "detector", "collection")  # submission order: longest first


class ToyWorldError(RuntimeError):
    """A toy world folder that is incomplete, corrupted or below its quality gates."""


# ---------------------------------------------------------------------------------------------------------
# Numeric environment and cache keys
# ---------------------------------------------------------------------------------------------------------


def portable_numerics_env() -> dict[str, str]:
    """Environment for a build process: one thread, and on x86-64 every library pinned to AVX2 kernels.

    Must be in place before torch / numpy load (the build sets it for its spawned processes only).
    """
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if platform.machine().lower() in ("x86_64", "amd64"):
        env |= {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
        try:  # numpy's private list of CPU features, which moved in numpy 2: imported on use, either way
            from numpy._core._multiarray_umath import __cpu_dispatch__  # numpy >= 2
        except ImportError:
            from numpy.core._multiarray_umath import __cpu_dispatch__  # numpy < 2
        wide = [f for f in __cpu_dispatch__ if "512" in f or f == "X86_V4"]
        if wide:
            env["NPY_DISABLE_CPU_FEATURES"] = " ".join(wide)
    return env


@contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def sources_hash() -> str:
    """sha256 of the sources that shape the toy world's bytes: umo/toy/world, the ONNX export and umo/faces."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    sources = [*root.glob("toy/world/*.py"), root / "toy" / "onnx_export.py", *root.glob("faces/*.py")]
    for path in sorted(sources):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _versions() -> dict[str, str]:
    return {"torch": torch.__version__, "numpy": numpy.__version__, "onnx": onnx.__version__,
            "opencv": cv2.__version__, "safetensors": safetensors.__version__}


def _part_settings(name: str, cfg: ToyWorldConfig) -> dict[str, Any]:
    """The settings a part's bytes depend on (its cache key covers exactly these)."""
    c = to_dict(cfg)
    common = {"world_seed": cfg.world_seed, "n_identities": cfg.n_identities}
    if name == "collection":
        return common | {"collection": c["collection"]}
    if name == "detector":
        return common | {"n_train_identities": cfg.n_train_identities, "detector": c["detector"],
                         "eval_scenes": cfg.quality.eval_scenes}
    if name == "embedders":
        return common | {k: c[k] for k in ("n_train_identities", "faces_per_identity", "test_faces_per_identity",
                                           "reward", "judge")}
    if name == "second_judge":
        return common | {k: c[k] for k in ("n_train_identities", "faces_per_identity", "test_faces_per_identity",
                                           "second_judge")}
    raise ValueError(f"unknown toy world part {name!r}")


def parts_of(cfg: ToyWorldConfig) -> tuple[str, ...]:
    """The parts `cfg` builds, in submission order (the second judge only when configured)."""
    return tuple(n for n in PARTS if n != "second_judge" or cfg.second_judge is not None)


def part_keys(cfg: ToyWorldConfig) -> dict[str, str]:
    """Cache key of each part of `cfg`: sha256 of its settings, the sources, library versions and numerics."""
    shared = {"format": FORMAT_VERSION, "sources": sources_hash(), "versions": _versions(),
              "numerics": portable_numerics_env()}
    return {name: hashlib.sha256(json.dumps(shared | {"part": name, "settings": _part_settings(name, cfg)},
                                            sort_keys=True).encode()).hexdigest() for name in parts_of(cfg)}


def _agreement_key(keys: dict[str, str]) -> str:
    """The judges' agreement depends on exactly the two parts that made them."""
    return hashlib.sha256(f"{keys['embedders']}\0{keys['second_judge']}".encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToyWorld:
    """A built toy world: where each artifact lies, and its measured quality."""

    root: Path
    config: ToyWorldConfig
    quality: dict[str, Any]

    @property
    def raw(self) -> Path:
        return self.root / RAW_DIR

    @property
    def truth(self) -> Path:
        return self.root / TRUTH_FILE

    @property
    def models(self) -> Path:
        return self.root / MODELS_DIR

    @property
    def detector_path(self) -> Path:
        return self.models / DETECTOR_PACK / DETECTOR_FILE

    @property
    def reward_path(self) -> Path:
        return self.models / reward_file(self.config.reward)

    @property
    def judge_path(self) -> Path:
        return self.models / JUDGE_PACK / judge_file(self.config.judge)

    def judge_packs(self) -> list[tuple[str, str]]:
        """The evaluation judges in order, (name, pack folder under `models`): the judge (e.g. ("toy_r10",
        "toy_judge")), then the second judge when configured (e.g. ("toy_mbf", "toy_judge_mbf")).

        A judge's name is its arch; a second judge of the first one's arch (another seed) is named
        <arch>_seed<seed>, so that names stay unique. Its pack is toy_judge_<name without "toy_">."""
        packs = [(self.config.judge.arch, JUDGE_PACK)]
        second = self.config.second_judge
        if second is not None:
            name = second.arch if second.arch != self.config.judge.arch else f"{second.arch}_seed{second.seed}"
            packs.append((name, f"toy_judge_{name.removeprefix('toy_')}"))
        return packs

    @property
    def second_judge_path(self) -> Path | None:
        """The second judge's ONNX (judge_<arch>.onnx in its pack folder), or None when not configured."""
        if self.config.second_judge is None:
            return None
        return self.models / self.judge_packs()[1][1] / judge_file(self.config.second_judge)

    def part_files(self, name: str) -> list[Path]:
        """Every file a part wrote (sorted), for hashing."""
        if name == "collection":
            found = sorted(p for p in self.raw.rglob("*") if p.is_file()) if self.raw.is_dir() else []
            return found + [self.truth]
        if name == "detector":
            return [self.detector_path]
        if name == "embedders":
            return [self.reward_path, self.judge_path]
        if name == "second_judge" and self.second_judge_path is not None:
            return [self.second_judge_path]
        raise ValueError(f"unknown toy world part {name!r}")

    def faces_overrides(self) -> list[str]:
        """`-S` overrides pointing params.yaml's `faces` section at this world's models."""
        return [
            f"faces.detector.root={self.models}", f"faces.detector.pack={DETECTOR_PACK}",
            f"faces.embedder.path={self.reward_path}", f"faces.embedder.arch={self.config.reward.arch}",
            "faces.judges=" + json.dumps([{"name": name, "root": str(self.models), "pack": pack}
                                          for name, pack in self.judge_packs()], separators=(",", ":")),
        ]


# ---------------------------------------------------------------------------------------------------------
# Parts (each runs in a spawned process with the portable environment)
# ---------------------------------------------------------------------------------------------------------


def _init_process(level: int) -> None:
    """Spawned build processes log like the parent (progress of long parts stays visible)."""
    logging.basicConfig(level=level, format="%(levelname)s %(name)s [%(processName)s]: %(message)s")


def _run_part(name: str, root: str, cfg_data: dict[str, Any]) -> dict[str, Any]:
    """Build one part into `root`; returns {"metrics": {...}, "seconds": float}."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    cfg = from_dict(ToyWorldConfig, cfg_data, source="toyworld build")
    world = ToyWorld(Path(root), cfg, {})
    train_ids = range(cfg.n_train_identities)
    test_ids = range(cfg.n_train_identities, cfg.n_identities)
    t0 = time.perf_counter()
    metrics: dict[str, Any] = {}
    if name == "collection":
        shutil.rmtree(world.raw, ignore_errors=True)
        world.truth.unlink(missing_ok=True)
        meta = _write_collection(cfg, world.raw, world.truth)
        metrics = {k: meta[k] for k in ("n_groups", "n_images", "n_faces", "n_identities")}
    elif name == "detector":
        build_detector(world.detector_path.parent, cfg.world_seed, train_ids=train_ids, config=cfg.detector,
                       metadata=TOY_METADATA)
        # Measured through the real loading path: the pack folder, insightface's router, our batched SCRFD.
        detector = FaceDetector.from_model_root(world.models, DETECTOR_PACK)
        metrics = evaluate_detector(detector, cfg.world_seed, test_ids, n_scenes=cfg.quality.eval_scenes)
    elif name == "embedders":
        result = build_embedders(cfg.world_seed, reward=cfg.reward, reward_path=world.reward_path,
                                 judge=cfg.judge, judge_path=world.judge_path, train_ids=train_ids,
                                 test_ids=test_ids, per_id=cfg.faces_per_identity,
                                 per_test_id=cfg.test_faces_per_identity, metadata=TOY_METADATA)
        metrics = {k: v for k, v in result.items() if not k.endswith("_s")}
        _flag_toy_pack(world.judge_path.parent)
    elif name == "second_judge" and cfg.second_judge is not None:
        path = world.second_judge_path
        result = build_second_judge(cfg.world_seed, judge=cfg.second_judge, judge_path=path, test_ids=test_ids,
                                    per_id=cfg.faces_per_identity, per_test_id=cfg.test_faces_per_identity,
                                    metadata=TOY_METADATA)
        metrics = {k: v for k, v in result.items() if not k.endswith("_s")}
        _flag_toy_pack(path.parent)
    else:
        raise ValueError(f"unknown toy world part {name!r}")
    return {"metrics": metrics, "seconds": time.perf_counter() - t0}


def _flag_toy_pack(folder: Path) -> None:
    """The flag file the product reads in a model pack (umo.io.is_toy_world)."""
    flag = {"toy_world": True, "note": NOTICE}
    atomic_write_bytes(folder / TOY_WORLD_FILE, (json.dumps(flag, indent=2) + "\n").encode())


def _run_agreement(root: str, cfg_data: dict[str, Any]) -> dict[str, float]:
    """The judges' agreement on the held-out pairs (`judges_agreement`), in a build process like the parts."""
    torch.set_num_threads(1)
    cfg = from_dict(ToyWorldConfig, cfg_data, source="toyworld build")
    world = ToyWorld(Path(root), cfg, {})
    return judges_agreement(cfg.world_seed, [world.judge_path, world.second_judge_path],
                            range(cfg.n_train_identities, cfg.n_identities), cfg.test_faces_per_identity)


# ---------------------------------------------------------------------------------------------------------
# Quality
# ---------------------------------------------------------------------------------------------------------


def assess_quality(parts: dict[str, dict[str, Any]], cfg: ToyWorldConfig,
                   agreement: dict[str, float] | None = None) -> dict[str, Any]:
    """Gather the held-out metrics of the detector, embedders and second judge (with the judges' `agreement`,
    when there is one) and check them against cfg.quality."""
    det, emb = parts["detector"]["metrics"], parts["embedders"]["metrics"]
    q = cfg.quality
    measured = {
        "detector_precision": det["precision"],
        "detector_recall": det["recall"],
        "detector_landmark_error_px": det["lmk_mean"],
        "detector_eval_faces": int(det["n_faces"]),
        "reward_tar_at_far_1e-3": emb["tar@far1e-3"],
        "judge_tar_at_far_1e-3": emb["b_tar@far1e-3"],
        "reward_eer": emb["eer"],
        "judge_eer": emb["b_eer"],
        "reward_judge_score_correlation": emb["score_corr"],
        "reward_judge_impostor_correlation": emb.get("impostor_score_corr"),
        "verification_pairs": {"genuine": emb["n_genuine"], "impostor": emb["n_impostor"]},
    }
    gates = {
        "detector_precision": q.min_precision, "detector_recall": q.min_recall,
        "reward_tar_at_far_1e-3": q.min_tar, "judge_tar_at_far_1e-3": q.min_tar,
    }
    if cfg.second_judge is not None:
        second = parts["second_judge"]["metrics"]
        measured |= {"second_judge_tar_at_far_1e-3": second["tar@far1e-3"], "second_judge_eer": second["eer"],
                     "judges_score_correlation": (agreement or {}).get("score_corr"),
                     "judges_impostor_correlation": (agreement or {}).get("impostor_score_corr")}
        gates["second_judge_tar_at_far_1e-3"] = q.min_tar
    # nan (e.g. too few impostor pairs for FAR 1e-3) is stored as null and fails its gate
    measured = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in measured.items()}
    failures = [f"{k} {_fmt(measured[k])} < {v}" for k, v in gates.items()
                if measured[k] is None or not measured[k] >= v]
    return {"world": "toy", "measured": measured, "gates": gates, "passed": not failures, "failures": failures}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def quality_table(quality: dict[str, Any]) -> str:
    """The quality report as a fixed-width text table."""
    m, gates = quality["measured"], quality["gates"]
    rows = [("metric (held-out)", "value", "gate", "")]
    for key in ("detector_precision", "detector_recall", "detector_landmark_error_px",
                "reward_tar_at_far_1e-3", "judge_tar_at_far_1e-3", "second_judge_tar_at_far_1e-3",
                "reward_eer", "judge_eer", "second_judge_eer",
                "reward_judge_score_correlation", "reward_judge_impostor_correlation",
                "judges_score_correlation", "judges_impostor_correlation"):
        if key not in m:  # the second judge's rows, in a world without one
            continue
        gate = gates.get(key)
        ok = "" if gate is None else ("ok" if m[key] is not None and m[key] >= gate else "FAIL")
        rows.append((key, _fmt(m[key]), "" if gate is None else f">= {gate}", ok))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Build and load
# ---------------------------------------------------------------------------------------------------------


def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def _read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        log.warning("%s is not valid JSON (%s); rebuilding everything", path, err)
        return None
    return data if isinstance(data, dict) and data.get("world") == "toy" else None


def _cached(world: ToyWorld, name: str, key: str, manifest: dict[str, Any] | None) -> bool:
    entry = (manifest or {}).get("parts", {}).get(name)
    if not entry or entry.get("key") != key:
        return False
    files = {p.relative_to(world.root).as_posix(): p for p in world.part_files(name)}
    if set(files) != set(entry.get("files", {})):
        return False
    return all(p.is_file() and sha256_file(p) == entry["files"][rel] for rel, p in files.items())


@dataclass(frozen=True)
class BuildResult:
    world: ToyWorld
    reused: tuple[str, ...]
    """Parts taken from the cache."""
    seconds: dict[str, float]
    """Wall time of each part built now, and 'total'."""


def build_toyworld(out: str | Path, cfg: ToyWorldConfig, *, workers: int = 2, force: bool = False) -> BuildResult:
    """Build (or reuse) the toy world in `out`; see the module docstring. Raises ToyWorldError when the
    result is below cfg.quality's gates (the manifest records that, so loading it is refused too)."""
    t_start = time.perf_counter()
    root = Path(out).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    world = ToyWorld(root, cfg, {})
    keys = part_keys(cfg)
    manifest = None if force else _read_manifest(root)
    reused = tuple(n for n in keys if _cached(world, n, keys[n], manifest))
    parts: dict[str, dict[str, Any]] = {n: manifest["parts"][n] for n in reused} if manifest else {}
    todo = [n for n in keys if n not in reused]
    for name in reused:
        log.info("toy world: %s reused from the cache (%s)", name, root)
    # The judges' agreement (measured on the files of two parts) is kept while both parts are reused under the
    # keys it was measured with; otherwise it is measured again once both are built.
    agreement_key = _agreement_key(keys) if cfg.second_judge is not None else None
    kept = (manifest or {}).get("agreement") or {}
    both_reused = {"embedders", "second_judge"} <= set(reused)
    agreement = kept.get("metrics") if both_reused and kept.get("key") == agreement_key else None
    measure_agreement = agreement_key is not None and agreement is None
    seconds: dict[str, float] = {}
    error: BaseException | None = None
    if todo or measure_agreement:
        log.info("toy world: building %s in %s (%d processes)", ", ".join(todo) or "the judges' agreement", root,
                 min(workers, max(1, len(todo))))
        with _environment(portable_numerics_env()), ProcessPoolExecutor(
                max(1, min(workers, len(todo))), mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_process, initargs=(logging.getLogger().getEffectiveLevel(),)) as pool:
            futures = {n: pool.submit(_run_part, n, str(root), to_dict(cfg)) for n in todo}
            for name, future in futures.items():
                try:
                    out_part = future.result()
                except BaseException as err:  # keep the parts that did finish, then re-raise
                    log.error("toy world: part %s failed: %s", name, err)
                    error = error or err
                    continue
                seconds[name] = out_part["seconds"]
                files = {p.relative_to(root).as_posix(): sha256_file(p) for p in world.part_files(name)}
                parts[name] = {"key": keys[name], "files": files, "metrics": out_part["metrics"]}
                log.info("toy world: %s built in %.0f s", name, out_part["seconds"])
            if measure_agreement and error is None:
                t0 = time.perf_counter()
                try:
                    agreement = pool.submit(_run_agreement, str(root), to_dict(cfg)).result()
                except BaseException as err:
                    log.error("toy world: the judges' agreement failed: %s", err)
                    error = err
                seconds["agreement"] = time.perf_counter() - t0
    quality = assess_quality(parts, cfg, agreement) if error is None else None
    manifest = {
        "world": "toy", "notice": NOTICE, "format_version": FORMAT_VERSION, "umo_version": __version__,
        "config": to_dict(cfg), "versions": _versions(), "numerics": portable_numerics_env(),
        "parts": dict(sorted(parts.items())), "quality": quality,
    }
    if agreement is not None:
        manifest["agreement"] = {"key": agreement_key, "metrics": agreement}
    if quality is not None:
        _atomic_json(root / QUALITY_FILE, quality)
    _atomic_json(root / MANIFEST_FILE, manifest)  # the pointer: written last
    if error is not None:
        raise error
    seconds["total"] = time.perf_counter() - t_start
    world = ToyWorld(root, cfg, quality)
    if not quality["passed"]:
        raise ToyWorldError(f"{root}: toy world below its quality gates: {'; '.join(quality['failures'])}")
    return BuildResult(world, reused, seconds)


def _write_collection(cfg: ToyWorldConfig, out: Path, truth: Path) -> dict[str, Any]:
    """The raw collection of `cfg` into `out`, its ground truth at `truth` (the build's part and `write_raw`)."""
    c = cfg.collection
    return write_raw_collection(out, world_seed=cfg.world_seed, n_groups=c.n_groups,
                                images_per_group=tuple(c.images_per_group), cast_size=tuple(c.cast_size),
                                n_identities=cfg.n_identities, image_size=tuple(c.image_size), truth_path=truth,
                                cast=None if c.cast is None else tuple(c.cast))


def _write_raw(out: str, truth: str, cfg_data: dict[str, Any]) -> dict[str, Any]:
    return _write_collection(from_dict(ToyWorldConfig, cfg_data, source="toyworld raw"), Path(out), Path(truth))


def write_raw(out: str | Path, cfg: ToyWorldConfig, *, truth: str | Path) -> dict[str, Any]:
    """Only the toy world's raw collection (seconds), into `out`, with its ground truth at `truth` (outside
    `out`): the same bytes as a full build's `toy_raw/`, so the embedded default's `data/` matches the hash
    in `data.dvc` on any machine. Runs in one spawned process with the build's numeric environment."""
    with _environment(portable_numerics_env()), ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn"), initializer=_init_process,
            initargs=(logging.getLogger().getEffectiveLevel(),)) as pool:
        return pool.submit(_write_raw, str(out), str(truth), to_dict(cfg)).result()


def load_toyworld(root: str | Path, *, verify: bool = False) -> ToyWorld:
    """Open a built toy world; refuses one that is incomplete or below its quality gates.

    verify: also re-hash every file against the manifest (slower; catches edited or corrupted files).
    """
    root = Path(root).expanduser().resolve()
    manifest = _read_manifest(root)
    if manifest is None:
        raise ToyWorldError(f"{root}: no toy world here ({MANIFEST_FILE} missing or unreadable); "
                            f"run `umo toyworld build --out {root}`")
    quality = manifest.get("quality")
    cfg = from_dict(ToyWorldConfig, manifest["config"], source=str(root / MANIFEST_FILE))
    if not quality or set(manifest.get("parts", {})) != set(parts_of(cfg)):
        raise ToyWorldError(f"{root}: toy world build is incomplete; run `umo toyworld build --out {root}` again")
    if not quality["passed"]:
        raise ToyWorldError(f"{root}: toy world below its quality gates: {'; '.join(quality['failures'])}")
    world = ToyWorld(root, cfg, quality)
    for name, entry in manifest["parts"].items():
        for rel, digest in entry["files"].items():
            path = root / rel
            if not path.is_file():
                raise ToyWorldError(f"{path}: missing (listed in {root / MANIFEST_FILE})")
            if verify and sha256_file(path) != digest:
                raise ToyWorldError(f"{path}: sha256 differs from {root / MANIFEST_FILE}; rebuild the toy world")
    return world
