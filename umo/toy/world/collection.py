"""Write a raw toy-world image collection, laid out like a user's raw data, with its ground truth apart.

Layout (what data prep sees):

    out_dir/toyworld.json                 {"toy_world": true, seed, counts, note}: says it is synthetic
    out_dir/<group>/<image>.png           RGB PNGs
    out_dir/<group>/captions.jsonl        one {"caption": ..., "image": "<file name>"} per line, file order

A group stands for one video, album or event: its own cast of 2..6 identities (an identity occasionally
recurs in another group, like an actor in two videos), 6..20 images each showing 1..4 of the cast.

With a `cast` (the embedded default's: the toy base generator's cast, `umo.toy.cast`), a group is a photo
SESSION instead: 2..3 people of that cast, every image a studio photo of two of them side by side (left-right
order random), cut to the strip of rows around their heads (image_size [height, width]: a width-square render
cut to height rows). These are the photos the toy base draws, so the chain's fine-tuning has something to move.

Ground truth goes OUTSIDE out_dir (default `out_dir.parent / f"{out_dir.name}_truth.jsonl"`), one line
per image: {"boxes", "caption", "group", "identity_ids", "image", "landmarks"}, faces left to right, pixel
coordinates rounded to 2 decimals.

Byte-determinism: the plan (casts, image counts) comes from one seeded generator and every image from
its own `default_rng((world_seed, group, image, salt))`; PNGs are encoded by OpenCV at a fixed compression
level; JSON has sorted keys and rounded floats; nothing records a time or an absolute path; every file is
written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from umo.io import TOY_WORLD_FILE, atomic_write_bytes
from umo.toy.world.background import SCENE_SETTINGS
from umo.toy.world.identity import MAX_IDENTITIES, make_identity
from umo.toy.world.render import MAX_FACES, Scene, head_strip, render_group, render_scene

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA_FILE = TOY_WORLD_FILE
CAPTIONS_FILE = "captions.jsonl"
NOTE = (
    "Synthetic toy-world data rendered by umo.toy.world: cartoon identities, not real people. "
    "Ground truth lives outside this folder."
)
GROUP_KINDS = ("video", "album", "event")
_PLAN_SALT = 0x504C414E  # "PLAN": the plan's stream differs from every identity's (world_seed, id) stream
_IMAGE_SALT = 0x494D47  # "IMG"
# zlib level 6 with the RLE strategy: byte-deterministic for a given OpenCV/zlib, and ~4x faster than the
# default strategy on these images (3 vs 14 ms per 256x256 image) with slightly smaller files.
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 6, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]


@dataclass(frozen=True)
class GroupPlan:
    """One group: folder name, cast (identity ids), setting, and which cast members each image shows."""

    name: str
    cast: tuple[int, ...]
    setting: str
    images: tuple[tuple[int, ...], ...]


def default_truth_path(out_dir: Path) -> Path:
    """Where the ground truth of `out_dir` goes by default: next to it, never inside it."""
    return out_dir.parent / f"{out_dir.name}_truth.jsonl"


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode("utf-8")


def _rounded(a: np.ndarray) -> list:
    return np.round(a.astype(np.float64), 2).tolist()


def plan_collection(
    world_seed: int,
    n_groups: int,
    *,
    images_per_group: tuple[int, int] = (6, 20),
    cast_size: tuple[int, int] = (2, 6),
    n_identities: int = 500,
    recur_prob: float = 0.12,
) -> list[GroupPlan]:
    """Decide every group's cast and images (pure; deterministic in its arguments).

    Fresh cast members come from a seeded permutation of ids 0..n_identities-1; with probability
    `recur_prob` a member is instead someone already cast in an earlier group. Each image shows 1..4 of the
    cast, favouring those shown least so far, so everyone in a cast appears at least twice whenever the
    group has enough images.
    """
    lo_img, hi_img = images_per_group
    lo_cast, hi_cast = cast_size
    if n_groups < 1 or not 1 <= lo_img <= hi_img or not 1 <= lo_cast <= hi_cast:
        raise ValueError(
            f"need n_groups >= 1 and 1 <= low <= high ranges, got n_groups={n_groups}, "
            f"images_per_group={images_per_group}, cast_size={cast_size}"
        )
    if not hi_cast <= n_identities <= MAX_IDENTITIES:
        raise ValueError(f"n_identities must be in [{hi_cast}, {MAX_IDENTITIES}], got {n_identities}")
    rng = np.random.default_rng((world_seed, _PLAN_SALT))
    fresh = [int(i) for i in rng.permutation(n_identities)]
    used: list[int] = []  # in first-use order (never a set: its iteration order is not ours to rely on)
    plans = []
    for g in range(n_groups):
        kind = GROUP_KINDS[int(rng.integers(0, len(GROUP_KINDS)))]
        size = int(rng.integers(lo_cast, hi_cast + 1))
        cast: list[int] = []
        while len(cast) < size:
            candidates = [i for i in used if i not in cast]
            if candidates and (rng.random() < recur_prob or not fresh):
                cast.append(candidates[int(rng.integers(0, len(candidates)))])
            elif fresh:
                cast.append(fresh.pop(0))
            else:  # the pool is smaller than this cast: nobody left to add
                break
        for i in cast:
            if i not in used:
                used.append(i)
        shown = {i: 0 for i in cast}
        images = []
        for _ in range(int(rng.integers(lo_img, hi_img + 1))):
            k = int(rng.integers(1, min(MAX_FACES, len(cast)) + 1))
            tiebreak = rng.random(len(cast))
            picked = sorted(range(len(cast)), key=lambda j: (shown[cast[j]], tiebreak[j]))[:k]
            people = tuple(cast[j] for j in sorted(picked))
            for i in people:
                shown[i] += 1
            images.append(people)
        setting = SCENE_SETTINGS[int(rng.integers(0, len(SCENE_SETTINGS)))]
        plans.append(GroupPlan(f"{kind}_{g:04d}", tuple(cast), setting, tuple(images)))
    return plans


def plan_sessions(world_seed: int, n_groups: int, *, images_per_group: tuple[int, int], cast_size: tuple[int, int],
                  cast: tuple[int, int]) -> list[GroupPlan]:
    """Photo sessions of a cast [first, last) of ids (pure; deterministic): each group takes cast_size people of
    it, each image shows two of them, favouring those shown least so far."""
    lo_img, hi_img = images_per_group
    if n_groups < 1 or not 1 <= lo_img <= hi_img or not 2 <= cast_size[0] <= cast_size[1] <= cast[1] - cast[0]:
        raise ValueError(f"sessions need n_groups >= 1, 1 <= images low <= high and 2 <= cast_size low <= high <= "
                         f"the cast's size, got {n_groups}, {images_per_group}, {cast_size}, cast {cast}")
    rng = np.random.default_rng((world_seed, _PLAN_SALT, 2))
    plans = []
    for g in range(n_groups):
        size = int(rng.integers(cast_size[0], cast_size[1] + 1))
        people = tuple(sorted(int(i) for i in rng.choice(np.arange(*cast), size, replace=False)))
        shown = {i: 0 for i in people}
        images = []
        for _ in range(int(rng.integers(lo_img, hi_img + 1))):
            tiebreak = rng.random(size)
            pair = sorted(range(size), key=lambda j: (shown[people[j]], tiebreak[j]))[:2]
            for j in pair:
                shown[people[j]] += 1
            images.append(tuple(people[j] for j in sorted(pair)))
        plans.append(GroupPlan(f"session_{g:04d}", people, "in a studio", tuple(images)))
    return plans


def _image_name(plan: GroupPlan, index: int) -> str:
    prefix = {"video": "frame", "album": "photo", "event": "img", "session": "shot"}[plan.name.split("_")[0]]
    return f"{prefix}_{index:04d}.png"


def render_group_image(world_seed: int, group_index: int, plan: GroupPlan, index: int,
                       image_size: tuple[int, int]) -> Scene:
    """Image `index` of group `group_index`: its own generator, so any image can be re-rendered alone.
    Most images are in the group's setting; one in five elsewhere (a video cuts to another place)."""
    rng = np.random.default_rng((world_seed, group_index, index, _IMAGE_SALT))
    if plan.name.startswith("session_"):
        people = [make_identity(world_seed, i) for i in plan.images[index]]
        return head_strip(render_group(world_seed, people, rng, image_size[1]), image_size[0])
    setting = plan.setting
    if rng.random() < 0.2:
        setting = SCENE_SETTINGS[int(rng.integers(0, len(SCENE_SETTINGS)))]
    people = [make_identity(world_seed, i) for i in plan.images[index]]
    return render_scene(world_seed, people, rng, image_size, setting=setting)


def _encoded_image(job: tuple[int, int, GroupPlan, int, tuple[int, int]]) -> tuple[bytes, dict[str, Any]]:
    """Render one planned image: (PNG bytes, its truth row). Top-level so worker processes can run it."""
    world_seed, g, plan, i, image_size = job
    scene = render_group_image(world_seed, g, plan, i, image_size)
    name = _image_name(plan, i)
    ok, png = cv2.imencode(".png", cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR), PNG_PARAMS)
    if not ok:
        raise RuntimeError(f"{plan.name}/{name}: PNG encoding failed")
    row = {
        "group": plan.name,
        "image": name,
        "caption": scene.caption,
        "boxes": _rounded(scene.boxes),
        "landmarks": _rounded(scene.landmarks),
        "identity_ids": [int(v) for v in scene.identity_ids],
    }
    return png.tobytes(), row


def write_raw_collection(
    out_dir: Path,
    *,
    world_seed: int = 0,
    n_groups: int,
    images_per_group: tuple[int, int] = (6, 20),
    cast_size: tuple[int, int] = (2, 6),
    n_identities: int = 500,
    image_size: tuple[int, int] = (256, 256),
    truth_path: Path | None = None,
    workers: int = 1,
    cast: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Render and write the raw collection (layout in the module docstring); returns its metadata.

    out_dir must not exist or be empty (stale files would break byte-identity). image_size: (H, W) px.
    cast: [first, last) ids: photo sessions of that cast (module docstring) instead of albums.
    workers > 1 renders in that many spawned processes (same bytes; worth it from a few hundred images).
    Returns the `toyworld.json` content plus "out_dir" and "truth_path" (absolute, NOT written to disk).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: raw collection output folder exists and is not empty")
    truth_path = Path(truth_path) if truth_path is not None else default_truth_path(out_dir)
    if truth_path.resolve().is_relative_to(out_dir.resolve()):
        raise ValueError(f"truth_path {truth_path} must lie outside the collection {out_dir}")
    if cast is not None:
        plans = plan_sessions(world_seed, n_groups, images_per_group=images_per_group, cast_size=cast_size,
                              cast=(int(cast[0]), int(cast[1])))
    else:
        plans = plan_collection(world_seed, n_groups, images_per_group=images_per_group, cast_size=cast_size,
                                n_identities=n_identities)
    out_dir.mkdir(parents=True, exist_ok=True)
    truth_path.parent.mkdir(parents=True, exist_ok=True)

    truth: list[dict[str, Any]] = []
    n_images = 0
    n_faces = 0
    jobs = [
        (world_seed, g, plan, i, (int(image_size[0]), int(image_size[1])))
        for g, plan in enumerate(plans)
        for i in range(len(plan.images))
    ]
    captions: dict[str, list[dict[str, str]]] = {p.name: [] for p in plans}
    # Every image has its own generator, so the worker count changes the speed, never the bytes.
    pool = (
        ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
    )
    try:
        results = pool.map(_encoded_image, jobs, chunksize=8) if pool else map(_encoded_image, jobs)
        for (_, _, plan, i, _), (png, row) in tqdm(
            zip(jobs, results), total=len(jobs), desc="toy world: raw collection", unit="img", disable=None
        ):
            group_dir = out_dir / plan.name
            group_dir.mkdir(exist_ok=True)
            atomic_write_bytes(group_dir / row["image"], png)
            captions[plan.name].append({"image": row["image"], "caption": row["caption"]})
            truth.append(row)
            n_images += 1
            n_faces += len(row["identity_ids"])
    finally:
        if pool:
            pool.shutdown()
    for plan in plans:
        atomic_write_bytes(out_dir / plan.name / CAPTIONS_FILE, _jsonl(captions[plan.name]))
    atomic_write_bytes(truth_path, _jsonl(truth))

    identities = sorted({i for p in plans for i in p.cast})
    meta: dict[str, Any] = {
        "toy_world": True,
        "format_version": FORMAT_VERSION,
        "world_seed": int(world_seed),
        "n_groups": len(plans),
        "n_images": n_images,
        "n_faces": n_faces,
        "n_identities": len(identities),
        "identity_pool": int(n_identities),
        "image_size": [int(image_size[0]), int(image_size[1])],
        "cast": None if cast is None else [int(cast[0]), int(cast[1])],
        "note": NOTE,
    }
    atomic_write_bytes(out_dir / METADATA_FILE, (json.dumps(meta, sort_keys=True, indent=2) + "\n").encode())
    log.info(
        "toy world: wrote %d images in %d groups to %s (truth: %s)", n_images, len(plans), out_dir, truth_path
    )
    return {**meta, "out_dir": str(out_dir), "truth_path": str(truth_path)}


def load_truth(path: Path) -> list[dict[str, Any]]:
    """Read a truth file back: one dict per image, arrays as numpy (boxes (K, 4), landmarks (K, 5, 2) float32,
    identity_ids (K,) int64)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
            r["boxes"] = np.asarray(r["boxes"], np.float32).reshape(-1, 4)
            r["landmarks"] = np.asarray(r["landmarks"], np.float32).reshape(-1, 5, 2)
            r["identity_ids"] = np.asarray(r["identity_ids"], np.int64)
            rows.append(r)
    return rows
