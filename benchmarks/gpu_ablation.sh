#!/usr/bin/env bash
# The toy-world ablation at GPU scale, one command on one GPU:
#
#   bash benchmarks/gpu_ablation.sh            # results: artifacts/gpu-ablation/{closed,open}/, one JSON + table
#
# The same experiment as `make ablation` (docs/ablation.md), larger:
#   - a bigger toy base: 12,000 photos of the cast, hidden 512 (8 heads x 64), 6 + 6 blocks, 6,000 steps of 64,
#     trained on the GPU (`umo toybase build --device cuda`), held to the same gate;
#   - 10 seeds per arm, 300 fine-tuning steps of batch 8;
#   - twice: CLOSED set (the held-out photos show the base's own cast, as on the CPU) and OPEN set (the test
#     photos show 16 other held-out people, unseen by the generator, the reward and the judge alike:
#     toybase.photos.test_cast).
# Budget: about 10 minutes on one H100/H200 once installed (not yet measured: no GPU was lent when it was written;
# the toy world's face models are built on the CPU first and cached, about 4 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${UMO_SKIP_SETUP:-}" ] || bash scripts/setup.sh
PY=.venv/bin/python
UMO=.venv/bin/umo
OUT=${UMO_GPU_OUT:-artifacts/gpu-ablation}
SEEDS=${UMO_GPU_SEEDS:-"0 1 2 3 4 5 6 7 8 9"}
mkdir -p "$OUT"
start=$(date +%s)

$UMO toyworld build --out artifacts/toyworld --workers 3
$UMO prepare    # the main chain's train samples (photo sessions of the cast): what every arm fine-tunes on

BASE=(-S toybase.photos.n_train=12000 -S toybase.model.heads=8 -S toybase.model.head_dim=64
      -S toybase.model.double_blocks=6 -S toybase.model.single_blocks=6 -S toybase.model.steps=6000
      -S toybase.model.batch=64 -S toybase.model.lr=0.0005 -S toybase.vae.steps=3000 -S toybase.vae.batch=64)
TRAIN=(-S train.max_steps=300 -S train.batch_size=8 -S train.checkpoint_every=300 -S train.sample_every=0
       -S ablation.seeds="[${SEEDS// /, }]" -S ablation.bootstrap=10000)

for variant in closed open; do
  dir=$OUT/$variant
  extra=()
  [ "$variant" = open ] && extra=(-S toybase.photos.test_cast=[416,432])
  $UMO toybase build --device cuda --out "$dir/toybase" "${BASE[@]}" "${extra[@]}" || {
    echo "gpu ablation ($variant): uninformative base, no arm trained (see $dir/toybase/gate.json)"; continue; }
  common=(--params ablation/params.yaml -S ablation.out="$dir/ablation" -S ablation.toybase="$dir/toybase"
          -S generator.path="$dir/toybase/generator" -S eval.path="$dir/toybase/photos/test.json" "${TRAIN[@]}")
  for seed in $SEEDS; do
    for arm in sft sir mimr; do
      $UMO ablation arm --arm $arm --seed "$seed" "${common[@]}" >/dev/null
    done
  done
  $UMO ablation evaluate "${common[@]}" >/dev/null
  printf '# GPU ablation (%s set)\n\n%s\n%s\n' "$variant" "<!-- umo ablation report: start -->" \
    "<!-- umo ablation report: end -->" > "$dir/ablation.md"
  $UMO ablation report --doc "$dir/ablation.md" "${common[@]}" >/dev/null
done

$PY - "$OUT" "$(( $(date +%s) - start ))" <<'EOF'
import json, sys
from pathlib import Path
out, seconds = Path(sys.argv[1]), int(sys.argv[2])
result = {"seconds": seconds, "variants": {}}
for variant in ("closed", "open"):
    path = out / variant / "ablation" / "summary.json"
    if path.is_file():
        s = json.loads(path.read_text())
        result["variants"][variant] = {k: s[k] for k in ("base_gate", "H1", "H2") if k in s}
    else:
        gate = out / variant / "toybase" / "gate.json"
        result["variants"][variant] = {"base_gate": json.loads(gate.read_text()) if gate.is_file() else None}
(out / "gpu_ablation.json").write_text(json.dumps(result, indent=1) + "\n")
print(f"{'variant':8s} {'base ID-Sim':>12s} {'H1 est':>8s} {'H1 holds':>9s} {'H2 est':>8s} {'H2 holds':>9s}")
for v, r in result["variants"].items():
    g = (r.get("base_gate") or {}).get("measured", {})
    h1, h2 = r.get("H1", {}), r.get("H2", {})
    print(f"{v:8s} {str(g.get('id_sim')):>12s} {str(h1.get('estimate')):>8s} {str(h1.get('holds')):>9s} "
          f"{str(h2.get('estimate')):>8s} {str(h2.get('holds')):>9s}")
print(f"{seconds} s wall; {out / 'gpu_ablation.json'}")
EOF
