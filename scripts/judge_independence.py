"""How independent are the toy world's judge and reward embedder? Trains both (params.yaml's toyworld settings)
with the identity ranges given here, in a temporary folder, and prints their held-out verification numbers and
score correlations (all pairs, and impostor pairs only). The measurement compares the old setting (both learn ids
0-399) with the default (reward 0-199, judge 200-399):

    .venv/bin/python scripts/judge_independence.py --reward 0 400 --judge 0 400 --per-id 8   # before
    .venv/bin/python scripts/judge_independence.py                                          # params.yaml

About 1 min per embedder on 2 cores (before: TAR 0.945 / 0.961, correlation 0.777, impostors 0.736;
after: 0.953 / 0.951, 0.703, 0.654).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from dataclasses import replace
from pathlib import Path

from umo.config import load_config
from umo.toy.world.embedders import build_embedders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--reward", type=int, nargs=2, default=None, help="[first, last) ids of the reward")
    parser.add_argument("--judge", type=int, nargs=2, default=None, help="[first, last) ids of the judge")
    parser.add_argument("--per-id", type=int, default=None, help="training crops per identity")
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.params).section("toyworld")
    reward = replace(cfg.reward, identities=args.reward) if args.reward else cfg.reward
    judge = replace(cfg.judge, identities=args.judge) if args.judge else cfg.judge
    with tempfile.TemporaryDirectory() as tmp:
        result = build_embedders(cfg.world_seed, reward=reward, reward_path=Path(tmp) / "reward.safetensors",
                                 judge=judge, judge_path=Path(tmp) / "judge.onnx",
                                 train_ids=range(cfg.n_train_identities),
                                 test_ids=range(cfg.n_train_identities, cfg.n_identities),
                                 per_id=args.per_id or cfg.faces_per_identity,
                                 per_test_id=cfg.test_faces_per_identity)
    result |= {"reward_identities": reward.identities, "judge_identities": judge.identities,
               "per_id": args.per_id or cfg.faces_per_identity}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
