"""A smoke test of the distributed launch path: 2-process DDP training of a LoRA, on one GPU (or the CPU).

    accelerate launch --multi_gpu --num_processes 2 benchmarks/ddp_smoke.py OUT          # one GPU
    accelerate launch --config_file infra/accelerate/cpu.yaml --multi_gpu --num_processes 2 \\
        benchmarks/ddp_smoke.py OUT                                                       # the CPU (gloo)

Both processes run `umo.train.loop.train` on the tiny FLUX.2 [klein] folder for a few steps with the tests'
reward (tests/trainkit.py: faces at fixed places, the small toy world's embedder), each on its own shard of the
data, and must end with the same LoRA, bit for bit. On one GPU both processes share it: NCCL refuses two ranks on
one device, so this smoke test runs DDP over gloo (which all-reduces CUDA tensors too); the step's collectives,
the launcher, the rendezvous and the checkpoints are the ones a multi-GPU run uses.

Writes OUT/ddp_smoke.json (processes, backend, device, seconds, identical) and prints one line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
STEPS = 3


def main(out: Path) -> int:
    import torch

    shared_gpu = torch.cuda.is_available() and torch.cuda.device_count() < int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if shared_gpu:
        os.environ["LOCAL_RANK"] = "0"  # every process on the one GPU (accelerate places rank r on cuda:r)
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available(), backend="gloo")
    if state.num_processes != 2:
        raise SystemExit(f"ddp_smoke: {state.num_processes} process(es) ({state.distributed_type}); launch 2")
    from safetensors.torch import load_file
    from toyworlds import build_small_world
    from trainkit import main as train_process
    from trainkit import make_manifest

    from umo.toy.tiny.flux2 import write_tiny_flux2

    world = build_small_world(ROOT / ".cache").world  # from the kept models (tests/toyworlds.py), under a lock
    if state.is_main_process:
        write_tiny_flux2(out / "generator")
        make_manifest(out / "data", world, n_samples=4)
    state.wait_for_everyone()
    t0 = time.perf_counter()
    # the distributed tests' training process: each rank writes its LoRA to run/rank<r>.safetensors, waits for
    # the others, then ends the process group
    train_process([str(world.root), str(out / "generator"), str(out / "data" / "train.json"), str(out / "run"),
                   f"train.max_steps={STEPS}"])
    seconds = time.perf_counter() - t0
    if state.is_main_process:
        loras = [load_file(str(out / "run" / f"rank{r}.safetensors")) for r in range(state.num_processes)]
        identical = all(set(a) == set(loras[0]) and all(torch.equal(a[k], loras[0][k]) for k in a) for a in loras)
        report = {"processes": state.num_processes, "backend": state.backend, "device": str(state.device),
                  "shared_gpu": shared_gpu, "steps": STEPS, "seconds": round(seconds, 2), "identical": identical,
                  "passed": identical and state.num_processes == 2}
        (out / "ddp_smoke.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"DDP smoke: {state.num_processes} processes ({state.backend}) on {state.device}, {STEPS} steps in "
              f"{seconds:.1f} s, LoRAs {'identical' if identical else 'DIFFER'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1]).resolve()))
