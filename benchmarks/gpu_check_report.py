"""The GPU check's one JSON and one table, from the parts benchmarks/gpu_check.sh ran (see there).

    python benchmarks/gpu_check_report.py PARTS_DIR --seconds S --out benchmarks/results/gpu_check.json [--dry-run]

Each goal is PASS or FAIL only where it was measured; a part that failed, timed out or could not run on this
machine (the CUDA execution provider without onnxruntime-gpu, say) says so, and is never a pass.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
from pathlib import Path

GOALS = {"kv_speedup": 1.3, "reward_over_loop": 5.0}
PHASE_ROWS = ("condition", "diff_loss", "sampling", "grad_step", "decode", "reward", "detection", "embedding",
              "backward", "other")
SUB_PHASES = ("detection", "embedding")  # inside reward


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _gpu() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _status(parts: Path, name: str) -> dict:
    status = _read(parts / f"{name}.status.json") or {"rc": None, "seconds": None}
    status["ran"] = status["rc"] == 0
    if status["rc"] == 124:
        status["why"] = "past its time limit"
    elif status["rc"] not in (0, None):
        status["why"] = f"exit {status['rc']} (log: {parts / f'{name}.log'})"
    elif status["rc"] is None:
        status["why"] = "not run"
    return status


def collect(parts: Path, seconds: int, dry_run: bool) -> dict:
    report = {"benchmark": "gpu_check", "dry_run": dry_run, "seconds": seconds,
              "machine": {"gpu": _gpu(), "platform": platform.platform(), "python": platform.python_version()},
              "parts": {}}
    step = _read(parts / "train_step.json") if _status(parts, "train_step")["ran"] else None
    entry = {"status": _status(parts, "train_step")}
    if step:
        plain = step["results"]["plain"]
        phases = dict(plain["phases_s"])
        phases["other"] = phases["step"] - sum(v for k, v in phases.items() if k not in (*SUB_PHASES, "step"))
        entry |= {"size": step["size"], "device": step["device"], "settings": step["settings"],
                  "seconds_per_step": phases["step"], "peak_memory_gib": plain["peak_memory_gib"],
                  "phases_s": {k: phases.get(k) for k in PHASE_ROWS},
                  "phase_share": {k: phases[k] / phases["step"] for k in PHASE_ROWS if k in phases},
                  "mfu": (step["results"].get("flops") or {}).get("mfu"),
                  "model_flops_per_step": (step["results"].get("flops") or {}).get("model_flops_per_step")}
        kv = step["results"].get("kv_cache") or []
        real = kv[-1] if kv else None  # the last scenario: the largest sizes
        entry["kv_cache"] = None if real is None else {
            "scenario": real["scenario"], "speedup": real["speedup"], "goal": GOALS["kv_speedup"],
            "passed": real["speedup"] >= GOALS["kv_speedup"]}
        share = {k: v for k, v in entry["phase_share"].items() if k not in (*SUB_PHASES, "other")}
        entry["dominant_phase"] = max(share, key=share.get)
    report["parts"]["train_step"] = entry

    reward = _read(parts / "reward.json") if _status(parts, "reward")["ran"] else None
    entry = {"status": _status(parts, "reward")}
    if reward:
        entry |= {"device": reward["environment"]["device"], "batch": reward["config"]["batch"],
                  "ms": {k: reward["ms"][k]["total"] for k in ("batched", "loop")} | {
                      "floor": reward["ms"]["floor_total"]},
                  "batched_over_floor": reward["batched_over_floor"], "speedup_over_loop": reward["speedup_over_loop"],
                  "goal_over_loop": GOALS["reward_over_loop"],
                  "passed": reward["speedup_over_loop"] >= GOALS["reward_over_loop"]}
    report["parts"]["reward"] = entry

    detect = _read(parts / "detect.json") if _status(parts, "detect")["ran"] else None
    entry = {"status": _status(parts, "detect")}
    if detect:
        entry |= {"batch": detect["batch"], "size": detect["size"], "cpu": detect["results"]["cpu"],
                  "cuda": detect["results"]["cuda"], "cuda_speedup": detect["cuda_speedup"]}
    report["parts"]["detection"] = entry

    ddp = _read(parts / "ddp" / "ddp_smoke.json") if _status(parts, "ddp")["ran"] else None
    report["parts"]["ddp_smoke"] = {"status": _status(parts, "ddp")} | (ddp or {})
    return report


def table(report: dict) -> str:
    p = report["parts"]
    head = "GPU check (DRY RUN: tiny sizes on the CPU; no number here is a GPU number)" if report["dry_run"] \
        else f"GPU check on {report['machine']['gpu']}"
    lines = [head, f"{report['seconds']} s in all", ""]

    def missing(part: dict) -> str:
        return f"not measured: {part['status'].get('why', 'no result')}"

    s = p["train_step"]
    if "seconds_per_step" in s:
        mfu = f"{s['mfu']:.1%}" if s.get("mfu") is not None else "n/a"
        lines.append(f"ReReFL step ({s['size']}, {s['device']}): {s['seconds_per_step']:.3f} s/step, peak "
                     f"{s['peak_memory_gib']:.2f} GiB, MFU {mfu}; dominant phase: {s['dominant_phase']}")
        for k in PHASE_ROWS:
            if s["phases_s"].get(k) is not None:
                indent = "    " if k in SUB_PHASES else "  "
                lines.append(f"{indent}{k:<12}{s['phases_s'][k]:9.4f} s {s['phase_share'][k]:6.1%}")
        kv = s.get("kv_cache")
        if kv:
            lines.append(f"reference KV cache ({kv['scenario']}): {kv['speedup']:.2f}x "
                         f"(goal >= {kv['goal']}x: {'PASS' if kv['passed'] else 'FAIL'})")
    else:
        lines.append(f"ReReFL step: {missing(s)}")
    r = p["reward"]
    if "speedup_over_loop" in r:
        lines.append(f"reward ({r['device']}, batch {r['batch']}): batched {r['ms']['batched']:.1f} ms, floor "
                     f"{r['ms']['floor']:.1f} ms ({r['batched_over_floor']:.2f}x the floor), per-image loop "
                     f"{r['ms']['loop']:.1f} ms: {r['speedup_over_loop']:.1f}x the loop (goal >= "
                     f"{r['goal_over_loop']}x: {'PASS' if r['passed'] else 'FAIL'})")
    else:
        lines.append(f"reward: {missing(r)}")
    d = p["detection"]
    if "cpu" in d:
        cuda = d["cuda"]
        cuda_s = (f"{cuda['ms_per_image']:.2f} ms/image on CUDA ({d['cuda_speedup']:.1f}x)" if cuda.get("available")
                  else f"CUDA not measured: {cuda['why']}")
        lines.append(f"face detection ({d['batch']} x {d['size']} px): {d['cpu']['ms_per_image']:.2f} ms/image on "
                     f"the CPU, {cuda_s}")
    else:
        lines.append(f"face detection: {missing(d)}")
    g = p["ddp_smoke"]
    if "identical" in g:
        lines.append(f"DDP smoke: {g['processes']} processes ({g['backend']}) on {g['device']}, {g['steps']} steps "
                     f"in {g['seconds']:.1f} s: {'PASS' if g['passed'] else 'FAIL'} (LoRAs "
                     f"{'identical' if g['identical'] else 'differ'})")
    else:
        lines.append(f"DDP smoke: {missing(g)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", type=Path)
    parser.add_argument("--seconds", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    report = collect(args.parts, args.seconds, args.dry_run)
    report["table"] = table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + report["table"])
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
