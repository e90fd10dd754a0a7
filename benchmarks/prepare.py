"""The face index of data prep: images/s of a first run, and the cost of a re-run after adding 10% new images.

On the toy world's raw collection (built or reused in --world): the collection minus a seeded 10% of its
images is indexed with an empty cache (first run), then the held-out images are added back and the index runs
again (incremental: only the new images are decoded, detected and embedded; the others are hashed and read
from the cache). Model loading is outside both timings; each run is repeated on fresh copies and the median is
reported. Target: incremental <= 15% of the first run.

Videos (`--videos N`): N videos of toy-world people (3 shots of `--shot-seconds` s (3) at 10 fps each, another
setting per shot, the people moving) are prepared by `umo prepare` (the CLI, so process start and model loading
are counted) on 1 process and on 2 (torchrun), each from empty caches: frames kept per second of the run. Then one more video is
added and the 1-process run repeated on its caches: the incremental run against the first. Peak memory is the
largest resident set of the run's processes (with 2, of the launcher's children): with `--shot-seconds` it shows
whether memory grows with a video's length.

Prints a table and writes JSON (benchmarks/results/prepare.json, or prepare_videos.json).
Run: `.venv/bin/python benchmarks/prepare.py [--world artifacts/toyworld] [--repeats 3] [--videos 6]
[--shot-seconds 3]`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from umo.config import load_config
from umo.data.faces import FaceCache, index_collection
from umo.data.prepare import _load_models

TARGET_RATIO = 0.15
ROOT = Path(__file__).resolve().parents[1]


def split_collection(raw: Path, dst: Path, fraction: float, seed: int) -> tuple[Path, Path]:
    """Copy `raw` to dst/base with a seeded `fraction` of the images moved to dst/new (same group folders)."""
    base, new = dst / "base", dst / "new"
    shutil.copytree(raw, base)
    images = sorted(p for p in base.rglob("*.png"))
    held = np.random.default_rng(seed).choice(len(images), size=max(1, round(fraction * len(images))), replace=False)
    for i in sorted(held.tolist()):
        target = new / images[i].relative_to(base)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(images[i], target)
    return base, new


def add_back(base: Path, new: Path) -> int:
    moved = 0
    for p in sorted(new.rglob("*.png")):
        shutil.move(p, base / p.relative_to(new))
        moved += 1
    return moved


def main() -> int | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=Path, default=ROOT / "artifacts" / "toyworld")
    parser.add_argument("--fraction", type=float, default=0.10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--videos", type=int, default=0, help="benchmark video ingest with this many videos")
    parser.add_argument("--shot-seconds", type=float, default=3.0, help="videos: the length of each of 3 shots")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from umo.toy.world.build import build_toyworld, load_toyworld

    base_cfg = load_config(ROOT / "params.yaml")
    if (args.world / "toyworld_build.json").is_file():  # any built world, as it is
        world = load_toyworld(args.world)
    else:
        world = build_toyworld(args.world, base_cfg.section("toyworld")).world
    if args.videos:
        return videos(world, args)
    args.out = args.out or ROOT / "benchmarks" / "results" / "prepare.json"
    config = load_config(ROOT / "params.yaml", world.faces_overrides())
    embedder, key = _load_models(config.faces, config.prepare.index_batch, "cpu")
    p = config.prepare
    first, incremental, sizes = [], [], {}
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            base, new = split_collection(world.raw, tmp / "raw", args.fraction, seed=r)
            cache = FaceCache(tmp / "cache", key)
            kw = dict(extensions=p.extensions, max_pixels=p.max_image_pixels, min_side=p.min_image_side, cache=cache,
                      embedder=embedder)
            t = time.perf_counter()
            _, _, c1 = index_collection(base, **kw)
            first.append(time.perf_counter() - t)
            sizes["new"] = add_back(base, new)
            t = time.perf_counter()
            _, _, c2 = index_collection(base, **kw)
            incremental.append(time.perf_counter() - t)
            sizes |= {"first_images": c1["computed"], "rerun_computed": c2["computed"], "rerun_cached": c2["cached"]}
    t_first, t_inc = statistics.median(first), statistics.median(incremental)
    ratio = t_inc / t_first
    result = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.machine()},
        "world": str(world.root), "images": sizes, "repeats": args.repeats,
        "first_run_s": round(t_first, 3), "first_run_images_per_s": round(sizes["first_images"] / t_first, 1),
        "incremental_s": round(t_inc, 3),
        "incremental_new_images_per_s": round(sizes["rerun_computed"] / t_inc, 1),
        "incremental_over_first": round(ratio, 4), "target": TARGET_RATIO, "met": ratio <= TARGET_RATIO,
        "runs": {"first_s": [round(v, 3) for v in first], "incremental_s": [round(v, 3) for v in incremental]},
    }
    print(f"{'run':<34}{'images':>8}{'seconds':>10}{'img/s':>9}")
    print(f"{'first (empty cache)':<34}{sizes['first_images']:>8}{t_first:>10.2f}{result['first_run_images_per_s']:>9.1f}")
    print(f"{'incremental (+10%: new / cached)':<34}{sizes['rerun_computed']:>4}/{sizes['rerun_cached']:<3}"
          f"{t_inc:>10.2f}{result['incremental_new_images_per_s']:>9.1f}")
    print(f"\nincremental / first = {ratio:.1%} (target <= {TARGET_RATIO:.0%}: {'met' if result['met'] else 'MISSED'})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def write_videos(world, folder: Path, which, shot_seconds: float = 3.0) -> None:
    """Toy-world videos: two held-out people each, 3 shots of `shot_seconds` at 10 fps (another setting and pose
    per shot)."""
    import av

    from umo.toy.world.identity import make_identity
    from umo.toy.world.render import render_scene

    seed, first = world.config.world_seed, world.config.n_train_identities
    folder.mkdir(parents=True, exist_ok=True)
    for v in which:
        people = [make_identity(seed, first + 2 * v), make_identity(seed, first + 2 * v + 1)]
        with av.open(str(folder / f"v{v}.mp4"), "w") as out:
            stream = out.add_stream("libx264", rate=10)
            stream.height, stream.width, stream.pix_fmt = 256, 384, "yuv420p"
            for shot in range(3):
                scene = render_scene(seed, people, np.random.default_rng(100 * v + shot), (256, 384)).image
                for i in range(round(10 * shot_seconds)):
                    shift = 30 - abs(30 - i % 60)  # the people drift right and back, 1 px a frame
                    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.roll(scene, shift, axis=1)),
                                                       format="rgb24")
                    for packet in stream.encode(frame):
                        out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)


def videos(world, args) -> int:
    import subprocess
    import sys

    out = args.out or ROOT / "benchmarks" / "results" / "prepare_videos.json"
    umo = Path(sys.executable).parent / "umo"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_videos(world, tmp / "data" / "clips", range(args.videos), args.shot_seconds)

        def run(name: str, processes: int) -> tuple[float, dict, float]:
            """Seconds, stats.json and peak resident MiB (of the run and its children) of one `umo prepare`."""
            sets = [*world.faces_overrides(), f"prepare.raw={tmp / 'data'}", f"prepare.out={tmp / name / 'out'}",
                    f"prepare.face_cache={tmp / name / 'faces'}", f"prepare.video.frame_cache={tmp / name / 'frames'}",
                    "prepare.truth=null", "prepare.synthetic.count=0", "prepare.contact_sheet=0"]
            cmd = [str(umo), "prepare", "--params", str(ROOT / "params.yaml"), *[a for s in sets for a in ("-S", s)]]
            if processes > 1:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                       "--master_addr", "127.0.0.1", "--master_port", "29531", "-m", "umo.cli", *cmd[1:]]
            env = os.environ | {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes))}
            t = time.perf_counter()
            with open(tmp / f"{name}.log", "wb") as log:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
                _, status, usage = os.wait4(proc.pid, 0)  # this run's own peak memory (and its children's)
            seconds = time.perf_counter() - t
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{(tmp / f'{name}.log').read_text()[-3000:]}")
            return seconds, json.loads((tmp / name / "out" / "stats.json").read_text()), usage.ru_maxrss / 1024

        one_s, one, one_peak = run("one", 1)
        two_s, two, two_peak = run("two", 2)
        write_videos(world, tmp / "data" / "clips", [args.videos], args.shot_seconds)
        inc_s, inc, _ = run("one", 1)
    frames, candidates = one["video"]["frames"], one["video"]["candidates"]
    result = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.machine()}, "world": str(world.root),
        "videos": args.videos, "shot_seconds": args.shot_seconds, "video": one["video"], "runs": {
            "first_1_process": {"seconds": round(one_s, 2), "frames_per_s": round(frames / one_s, 2),
                                "candidates_per_s": round(candidates / one_s, 2),
                                "face_index_s": one["seconds"]["face_index"],
                                "indexed_frames_per_s": round(frames / one["seconds"]["face_index"], 2),
                                "peak_rss_mib": round(one_peak)},
            "first_2_processes": {"seconds": round(two_s, 2), "frames_per_s": round(frames / two_s, 2),
                                  "candidates_per_s": round(candidates / two_s, 2),
                                  "face_index_s": two["seconds"]["face_index"],
                                  "indexed_frames_per_s": round(frames / two["seconds"]["face_index"], 2),
                                  "peak_rss_mib": round(two_peak)},
            "incremental_1_process": {"seconds": round(inc_s, 2), "added_videos": 1,
                                      "face_index_s": inc["seconds"]["face_index"],
                                      "index_computed": inc["images"]["index_computed"],
                                      "index_cached": inc["images"]["index_cached"],
                                      "over_first": round(inc_s / one_s, 3)}},
        "same_samples_1_and_2": one["samples"] == two["samples"]}
    print(f"{frames} frames kept of {candidates} candidates, {one['video']['shots']} shots, {args.videos} videos")
    print(f"{'run':<24}{'CLI wall s':>11}{'frames/s':>10}{'index s':>9}{'frames/s':>10}{'peak MiB':>10}")
    for name in ("first_1_process", "first_2_processes"):
        r = result["runs"][name]
        print(f"{name:<24}{r['seconds']:>11.2f}{r['frames_per_s']:>10.2f}{r['face_index_s']:>9.2f}"
              f"{r['indexed_frames_per_s']:>10.2f}{r['peak_rss_mib']:>10}")
    r = result["runs"]["incremental_1_process"]
    print(f"{'incremental (+1 video)':<24}{r['seconds']:>11.2f}{'':>10}{r['face_index_s']:>9.2f}   computed "
          f"{r['index_computed']}, cached {r['index_cached']}: wall {r['over_first']:.0%} of the first run")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
