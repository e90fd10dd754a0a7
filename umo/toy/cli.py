"""The toy world's `umo` subcommands (toyworld, toybase, generator tiny, ablation), added to the product's CLI
through the `umo.extensions` entry point: the product's parser never names them."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from umo.cli import add_config_args
from umo.config import load_config

log = logging.getLogger("umo")


def cmd_toyworld_build(args: argparse.Namespace) -> int:
    """Build (or reuse) the toy world; print its quality table; exit 1 when below the quality gates."""
    # lazy: a command loads its stage only when it runs (`umo --help` stays fast)
    from umo.toy.world.build import ToyWorldError, build_toyworld, quality_table


    config = load_config(args.params, args.overrides).section("toyworld")
    try:
        result = build_toyworld(args.out, config, workers=args.workers, force=args.force)
    except ToyWorldError as err:
        log.error("%s", err)
        try:
            print(quality_table(json.loads((args.out / "toy_quality.json").read_text())))
        except (OSError, ValueError, KeyError):
            pass
        return 1
    world = result.world
    print(quality_table(world.quality))
    built = {k: round(v, 1) for k, v in result.seconds.items()}
    print(f"\ntoy world in {world.root} (reused: {', '.join(result.reused) or 'nothing'}; seconds: {built})")
    print("use its face models with:", " ".join(f"-S {o}" for o in world.faces_overrides()))
    return 0


def cmd_toyworld_raw(args: argparse.Namespace) -> int:
    """Write only the toy world's raw collection (the embedded default's `data/`), truth kept outside it."""
    # lazy: a command loads its stage only when it runs (`umo --help` stays fast)
    from umo.toy.world.build import write_raw


    meta = write_raw(args.out, load_config(args.params, args.overrides).section("toyworld"), truth=args.truth)
    print(f"{meta['n_images']} images of {meta['n_identities']} toy identities in {meta['n_groups']} groups "
          f"-> {args.out} (ground truth: {args.truth})")
    return 0


def cmd_toybase_build(args: argparse.Namespace) -> int:
    """Build (or reuse) the toy base generator; print its gate; exit 1 when it is refused (uninformative)."""
    # lazy: a command loads its stage only when it runs (`umo --help` stays fast)
    from umo.toy.cast import UninformativeBase, build_toybase, gate_table


    config = load_config(args.params, args.overrides).section("toybase")
    try:
        manifest = build_toybase(config, out=args.out, force=args.force, workers=args.workers, device=args.device)
    except UninformativeBase as err:
        log.error("%s", err)
        try:
            print(gate_table(json.loads(((args.out or Path(config.out)) / "gate.json").read_text())))
        except (OSError, ValueError, KeyError):
            pass
        if args.keep_going:
            print("toy base REFUSED (uninformative base): the chain goes on with it (--keep-going), the ablation "
                  "will not train from it")
            return 0
        return 1
    print(gate_table(manifest["gate"]))
    print(f"\ntoy base in {args.out or config.out}/generator (seconds: {manifest['seconds']})")
    return 0


def cmd_toybase_scaling(args: argparse.Namespace) -> int:
    """Write the scaling set: items of 2 to 10 people of the toy base's cast (XVerseBench JSON)."""
    # lazy: a command loads its stage only when it runs (`umo --help` stays fast)
    from umo.toy.scaling import write_scaling_set

    stats = write_scaling_set(load_config(args.params, args.overrides).section("toybase"), args.out)
    print(json.dumps(stats, indent=2))
    return 0


def cmd_generator_tiny(args: argparse.Namespace) -> int:
    """Write the tiny seeded FLUX.2 [klein] pipeline folder (a tiny test generator)."""
    # lazy: a command loads its stage only when it runs (`umo --help` stays fast)
    from umo.toy.tiny.flux2 import write_tiny_flux2


    print(write_tiny_flux2(args.out))
    return 0


def cmd_ablation(args: argparse.Namespace) -> int:
    """The toy-world ablation's stages (ablation/dvc.yaml; docs/ablation.md)."""
    # lazy: a command loads its stage only when it runs (`umo --help` stays fast)
    from umo.toy import ablation


    try:
        if args.stage == "arm":
            result = ablation.run_arm(args.params, args.arm, args.seed, args.overrides)
        else:
            config = load_config(args.params, args.overrides)
            if args.stage == "evaluate":
                m = ablation.evaluate_all(config)["models"]
                result = {name: {k: m[name][k] for k in ablation.METRICS} for name in m}
            else:
                result = {"report": str(ablation.write_report(config, args.doc))}
    except ablation.AblationError as err:
        log.error("%s", err)
        return 1
    print(json.dumps(result, indent=2))
    return 0



def add_commands(sub) -> None:
    """Add the toy world's subcommands to the `umo` parser's subparsers."""
    toy = sub.add_parser("toyworld", help="the offline synthetic world (toy identities and face models)")
    toy_sub = toy.add_subparsers(dest="toyworld_command", metavar="ACTION", required=True)
    p = toy_sub.add_parser("build", help="write the raw collection and train the toy face models (cached)")
    add_config_args(p)
    p.add_argument("--out", type=Path, required=True, help="output folder (reused as a cache)")
    p.add_argument("--workers", type=int, default=2, help="parallel build processes (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="rebuild every part even when cached")
    p.set_defaults(func=cmd_toyworld_build)
    p = toy_sub.add_parser("raw", help="write only the raw collection (the embedded default's data/, seconds)")
    add_config_args(p)
    p.add_argument("--out", type=Path, default=Path("data"), help="empty or new folder (default: %(default)s)")
    p.add_argument("--truth", type=Path, default=Path("artifacts/toy_raw_truth.jsonl"),
                   help="ground-truth JSONL, outside --out (default: %(default)s)")
    p.set_defaults(func=cmd_toyworld_raw)

    p = sub.add_parser("toybase", help="the toy world's base generator (the stand-in for a pretrained model)")
    base_sub = p.add_subparsers(dest="toybase_command", metavar="ACTION", required=True)
    p = base_sub.add_parser("build", help="photos of the cast, VAE, transformer, then the gate (cached per step)")
    add_config_args(p)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: toybase.out)")
    p.add_argument("--workers", type=int, default=2, help="photo rendering processes (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="rebuild every step even when cached")
    p.add_argument("--device", default="cpu", help="torch device of the VAE and transformer training (cpu, cuda)")
    p.add_argument("--keep-going", action="store_true",
                   help="a refused base still exits 0 (the refusal is printed and recorded in gate.json): the main "
                   "chain's stage, so that make run completes and reports it; the ablation never trains from it")
    p.set_defaults(func=cmd_toybase_build)
    p = base_sub.add_parser("scaling", help="the scaling set: items of 2 to 10 people of the cast (XVerseBench JSON)")
    add_config_args(p)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: toybase.scaling.out)")
    p.set_defaults(func=cmd_toybase_scaling)

    gen = sub.add_parser("generator", help="generator utilities")
    gen_sub = gen.add_subparsers(dest="generator_command", metavar="ACTION", required=True)
    p = gen_sub.add_parser("tiny", help="write the tiny seeded FLUX.2 [klein] folder (tests)")
    p.add_argument("--out", type=Path, required=True, help="folder to write (replaced atomically)")
    p.set_defaults(func=cmd_generator_tiny)

    ab = sub.add_parser("ablation", help="the toy-world ablation SFT vs SIR vs MIMR (ablation/dvc.yaml)")
    ab_sub = ab.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, text in (("arm", "one fine-tuning run of an arm from the toy base (refused unless its gate passed)"),
                       ("evaluate", "the base and every run, judged on the held-out cast photos"),
                       ("report", "write the results page (table, intervals, curves, samples)")):
        p = ab_sub.add_parser(name, help=text)
        add_config_args(p)
        if name == "arm":
            p.add_argument("--arm", required=True, choices=["sft", "sir", "mimr"])
            p.add_argument("--seed", type=int, required=True)
        if name == "report":
            p.add_argument("--doc", type=Path, default=Path("docs/ablation.md"), help="the page (default: %(default)s)")
        p.set_defaults(func=cmd_ablation)

