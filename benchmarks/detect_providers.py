"""Face detection on onnxruntime's CUDA execution provider against its CPU provider.

The detector is the tests' small toy world's SCRFD-layout detector (tests/fixtures/toy-world-small, a trained
1.3 MB network with insightface's 9 outputs and 5 landmarks), run through `umo.faces.detect.FaceDetector` as the
reward and the evaluation run it: B images of S x S px per call (default 8 of 640 x 640, SCRFD's usual input),
letterboxing, the network, decoding and NMS. Real insightface packs are larger networks; what this measures is
the execution provider's effect on the same model and the same code path.

The CUDA provider needs the `onnxruntime-gpu` package (benchmarks/gpu_check.sh installs it beside umo's
onnxruntime); without it, or without a GPU, its row says "not available" and why.

Prints a table and writes JSON (benchmarks/results/detect_providers.json).
Run: `.venv/bin/python benchmarks/detect_providers.py [--batch 8] [--size 640] [--repeats 10]`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from umo.faces.detect import FaceDetector
from umo.faces.runtime import CPU, CUDA

ROOT = Path(__file__).resolve().parents[1]
DETECTOR = ROOT / "tests/fixtures/toy-world-small/models/faces/toy_detector/det_toy_scrfd.onnx"


def time_provider(path: Path, providers: list[str], images: torch.Tensor, repeats: int) -> dict:
    detector = FaceDetector(path, input_size=(images.shape[-1], images.shape[-2]), providers=providers)
    running = detector.session.get_providers()
    if running[0] != providers[0]:
        return {"available": False, "why": f"onnxruntime runs it on {running}"}
    for _ in range(2):  # warm-up: session start, CUDA kernels and memory
        detector.detect_tensor(images)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        found = detector.detect_tensor(images)
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1000
    return {"available": True, "providers": running, "ms_per_call": ms, "ms_per_image": ms / images.shape[0],
            "faces_found": int(sum(len(f) for f in found))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", type=Path, default=DETECTOR)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "detect_providers.json")
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, args.size, args.size, generator=g) * 2 - 1

    results = {"cpu": time_provider(args.detector, [CPU], images, args.repeats)}
    if CUDA not in ort.get_available_providers():
        results["cuda"] = {"available": False, "why": f"this onnxruntime ({ort.__version__}, "
                                                      f"{ort.get_device()}) has no {CUDA}"}
    else:
        results["cuda"] = time_provider(args.detector, [CUDA, CPU], images, args.repeats)
    speedup = (results["cpu"]["ms_per_call"] / results["cuda"]["ms_per_call"]
               if results["cuda"].get("available") else None)

    print(f"\nface detection, {args.batch} images of {args.size}x{args.size} per call, toy SCRFD-layout detector, "
          f"median of {args.repeats}\n")
    print(f"{'provider':<10}{'ms/call':>10}{'ms/image':>10}")
    for name, r in results.items():
        if r.get("available"):
            print(f"{name:<10}{r['ms_per_call']:10.1f}{r['ms_per_image']:10.2f}")
        else:
            print(f"{name:<10}  not available: {r['why']}")
    print(f"\nCUDA / CPU speed-up: {f'{speedup:.1f}x' if speedup else 'not measured'}")
    detector = args.detector.relative_to(ROOT) if args.detector.is_relative_to(ROOT) else args.detector
    report = {"benchmark": "detect_providers", "detector": str(detector),
              "batch": args.batch, "size": args.size, "repeats": args.repeats, "results": results,
              "cuda_speedup": speedup,
              "environment": {"onnxruntime": ort.__version__, "machine": platform.machine(),
                              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                              "numpy": np.__version__}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
