"""Batched MatchingReward vs. a per-sample loop in the style of the public reward code.

Same models and inputs for both: B generated images (default 8) of 256x256, each with 3 identities / 3 faces,
an r50-sized ArcFace IResNet with random weights, the SCRFD-signature marker detector of umo.toy.tiny.faces
loaded through insightface; forward + backward of the summed rewards.

- batched: `MatchingReward` (one detector call for the batch, one warp, one embedder forward + backward for all
  faces, reference embeddings cached);
- loop (public style): batch 1; per image detect, warp each face alone, embed the references AND each
  generated face alone on every call, assign, backward;
- floor: the detector on the generated images plus the embedder forward + backward on their faces, each timed
  alone: what the batched reward cannot avoid.

Prints a table (per stage and total, median over repeats) and writes JSON (benchmarks/results/reward.json).
Run: `.venv/bin/python benchmarks/reward.py [--batch 8] [--repeats 5] [--device cpu]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from timing import Clock, sync

from umo.faces.align import similarity_transforms, warp_faces
from umo.faces.detect import FaceDetector
from umo.faces.embed import ArcFaceEmbedder, iresnet
from umo.reward import CROP_FILL, MatchingReward, matching_reward
from umo.toy.onnx_export import export_detector_onnx
from umo.toy.tiny.faces import MarkerDetector, identity_patch, paste_faces, random_background

STAGES = ("detect", "warp", "embed", "assign", "backward")
TARGET_FLOOR_RATIO = 1.15  # batched total <= 1.15 x floor
TARGET_SPEEDUP = 1.5  # loop total >= 1.5 x batched total


def make_inputs(batch: int, size: int, face_size: int, seed: int, device: torch.device):
    """B images with 3 identities each (identities differ per sample), and each identity's aligned 112 crop."""
    centers = [(size * f, size / 2) for f in (0.1875, 0.5, 0.8125)]  # 48, 128, 208 px at 256: > 32 px apart
    images, ref_crops = [], []
    for b in range(batch):
        ids = [seed + 3 * b + k for k in range(3)]
        patches = [identity_patch(i, face_size) for i in ids]
        img, _ = paste_faces(random_background(seed + b, size, size), list(zip(patches, centers)), face_size)
        images.append(img)
        crops = []
        for i, patch in zip(ids, patches):  # reference photo: the identity alone, then aligned like the reward does
            ref_img, lms = paste_faces(random_background(10_000 + i, size, size), [(patch, centers[1])], face_size)
            mats, valid = similarity_transforms(lms)
            assert valid.all()
            t = torch.from_numpy(ref_img).permute(2, 0, 1)[None].float() / 127.5 - 1
            crops.append(warp_faces(t, torch.zeros(1, dtype=torch.long), mats))
        ref_crops.append(torch.cat(crops).to(device))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)
    return x.contiguous(), ref_crops


def run_batched(reward: MatchingReward, images: torch.Tensor, refs: list[torch.Tensor], clock: Clock) -> float:
    x = images.clone().requires_grad_(True)  # stands for the VAE decode output
    with clock("detect"):
        detections, _ = reward.detect(x)
    with clock("warp"):
        faces, owner, _ = reward.align(x, detections)
    with clock("embed"):
        emb = reward.embed(faces)
    with clock("assign"):
        rewards = reward.score(emb, owner, refs)[0]
    with clock("backward"):
        (-rewards.sum()).backward()
    return float(rewards.detach().sum())


def run_loop(detector: FaceDetector, embedder: ArcFaceEmbedder, images: torch.Tensor,
             ref_crops: list[torch.Tensor], clock: Clock) -> float:
    """The public reward code's shape: one sample at a time, every face (reference and generated) embedded alone."""
    total = 0.0
    for b in range(images.shape[0]):
        x = images[b : b + 1].clone().requires_grad_(True)
        with clock("detect"):
            (det,) = detector.detect_tensor(x.detach())
        with clock("warp"):
            mats, valid = similarity_transforms(det.landmarks)  # the faces MatchingReward.align keeps
            crops = [warp_faces(x, torch.zeros(1, dtype=torch.long), mats[j : j + 1], fill=CROP_FILL)
                     for j in np.flatnonzero(valid)]
        with clock("embed"):
            with torch.no_grad():
                ref = torch.cat([embedder(ref_crops[b][j : j + 1]) for j in range(ref_crops[b].shape[0])])
            gen = torch.cat([embedder(c) for c in crops])
        with clock("assign"):
            r = matching_reward(ref @ gen.T)
        with clock("backward"):
            (-r).backward()
        total += float(r.detach())
    return total


def floor(reward: MatchingReward, images: torch.Tensor, clock: Clock) -> None:
    """Detector alone on the batch, then embedder forward + backward alone on pre-cut crops."""
    with clock("detect"):
        detections, _ = reward.detect(images)
    faces, _, _ = reward.align(images, detections)
    faces = faces.detach().requires_grad_(True)
    with clock("embed"):
        reward.embed(faces).sum().backward()


def median_times(fn, repeats: int, device: torch.device) -> dict[str, float]:
    runs = []
    for _ in range(repeats):
        clock = Clock(device)
        sync(device)
        t0 = time.perf_counter()
        fn(clock)
        sync(device)
        runs.append({**clock.times, "total": time.perf_counter() - t0})
    keys = sorted({k for r in runs for k in r})
    return {k: statistics.median(r.get(k, 0.0) for r in runs) * 1000 for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--face-size", type=int, default=72)
    parser.add_argument("--arch", default="r50")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "reward.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_detector_onnx(MarkerDetector(face_size=args.face_size), Path(tmp) / "det_marker.onnx")
        detector = FaceDetector(onnx_path)
        embedder = ArcFaceEmbedder(iresnet(args.arch)).to(device)
        reward = MatchingReward(detector, embedder, kind="mimr")
        images, ref_crops = make_inputs(args.batch, args.size, args.face_size, seed=0, device=device)
        with torch.no_grad():
            refs = [embedder(c) for c in ref_crops]  # cached once, as data prep does

        # Same answer from both paths, and every face found, before timing anything.
        (dets,) = [reward.detect(images)[0]]
        assert [len(d) for d in dets] == [3] * args.batch, f"expected 3 faces per image, got {[len(d) for d in dets]}"
        r_batched = run_batched(reward, images, refs, Clock(device))
        r_loop = run_loop(detector, embedder, images, ref_crops, Clock(device))
        assert abs(r_batched - r_loop) < 1e-3 * max(1.0, abs(r_loop)), (r_batched, r_loop)

        results = {
            "batched": median_times(lambda c: run_batched(reward, images, refs, c), args.repeats, device),
            "loop": median_times(lambda c: run_loop(detector, embedder, images, ref_crops, c), args.repeats, device),
            "floor": median_times(lambda c: floor(reward, images, c), args.repeats, device),
        }

    floor_total = results["floor"]["detect"] + results["floor"]["embed"]
    ratio_floor = results["batched"]["total"] / floor_total
    speedup = results["loop"]["total"] / results["batched"]["total"]

    print(f"\nMatchingReward benchmark: batch {args.batch}, {args.size}x{args.size}, 3 ids x 3 faces, "
          f"{args.arch} random weights, device {device}, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats} (ms)\n")
    print(f"{'stage':<10}{'batched':>12}{'loop':>12}{'floor':>12}")
    for stage in (*STAGES, "total"):
        fl = floor_total if stage == "total" else results["floor"].get(stage)
        fl_s = f"{fl:12.1f}" if fl is not None else f"{'':>12}"
        print(f"{stage:<10}{results['batched'].get(stage, 0):12.1f}{results['loop'].get(stage, 0):12.1f}{fl_s}")
    print(f"\nbatched / floor = {ratio_floor:.3f}  (target <= {TARGET_FLOOR_RATIO})")
    print(f"loop / batched  = {speedup:.2f}x  (target >= {TARGET_SPEEDUP}x)")

    report = {
        "benchmark": "reward",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": {
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "device": str(device), "machine": platform.machine(), "python": platform.python_version(),
        },
        "ms": {**results, "floor_total": floor_total},
        "batched_over_floor": ratio_floor,
        "speedup_over_loop": speedup,
        "targets": {
            "batched_over_floor_max": TARGET_FLOOR_RATIO, "speedup_min": TARGET_SPEEDUP,
            "met": ratio_floor <= TARGET_FLOOR_RATIO and speedup >= TARGET_SPEEDUP,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
