"""The `umo` command: one subcommand per stage; nothing here computes, it parses and calls into umo/."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import yaml

from umo import __version__, failures
from umo.config import ConfigError, extensions, load_config, params_schema, to_dict
from umo.io import atomic_write_json

log = logging.getLogger("umo")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument(
        "-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one setting with a dotted key, e.g. -S reward.kind=sir (repeatable)",
    )


def cmd_config(args: argparse.Namespace) -> int:
    """Print the validated configuration, defaults filled in, as YAML (--schema: the JSON Schema of params.yaml)."""
    if args.schema:
        sys.stdout.write(json.dumps(params_schema(), indent=2) + "\n")
        return 0
    config = load_config(args.params, args.overrides)
    sys.stdout.write(yaml.safe_dump(to_dict(config), sort_keys=False))
    return 0


def cmd_faces_detect(args: argparse.Namespace) -> int:
    """Detect faces in image files with the configured model pack; print one JSON line per image."""
    # lazy: a command loads its stage only when it runs (`umo --help` stays fast)
    import cv2

    from umo.faces.detect import FaceDetector

    faces = load_config(args.params, args.overrides).faces
    detector = FaceDetector.from_config(faces.detector, providers=faces.providers)
    status = 0
    for path in args.images:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            log.error("%s: not a readable image", path)
            status = 1
            continue
        (det,) = detector.detect([cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)])
        print(json.dumps({
            "image": str(path),
            "faces": [
                {"box": b.round(1).tolist(), "landmarks": k.round(1).tolist(), "score": round(float(s), 4)}
                for b, k, s in zip(det.boxes, det.landmarks, det.scores)
            ],
        }))
    return status


def cmd_prepare(args: argparse.Namespace) -> int:
    """Data prep: raw collection -> face index -> identities -> samples -> manifests, stats.json, contact sheet
    (under `accelerate launch` or `torchrun`, the face index is sharded across the processes)."""
    # lazy: a command loads its stage only when it runs (`umo --help` stays fast)
    from umo.data.prepare import prepare

    config = load_config(args.params, args.overrides)
    result = prepare(config.prepare, faces=config.faces, generator=config.generator, seed=config.seed,
                     device=args.device)
    if result is None:  # a sharded run's other process: it indexed its share, the main process wrote the rest
        return 0
    print(json.dumps({"samples": result.stats["samples"], "rejects": result.stats["rejects"],
                      "identities": result.stats["identities"], "synthetic": result.stats["synthetic"]}, indent=2))
    for split, path in result.manifests.items():
        print(f"{split}: {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """ReReFL training of the LoRA (run it under `accelerate launch` or `torchrun` for several processes)."""
    # lazy: a command loads its stage only when it runs (`umo --help` stays fast)
    import torch.distributed as dist

    from umo.train.loop import NonFiniteLossError, train

    config = load_config(args.params, args.overrides)
    try:
        result = train(config.train, generator=config.generator, lora=config.lora, reward=config.reward,
                       faces=config.faces, seed=config.seed, manifest=args.manifest, out=args.out, resume=args.resume,
                       tracking=None if args.no_tracking else config.tracking)
    except NonFiniteLossError as err:
        log.error("%s", err)
        return 3
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:  # torchrun / accelerate launch: one report, from rank 0
        print(json.dumps(result.summary, indent=2))
        print(f"LoRA: {result.lora}")
    return 0


def cmd_convert_checkpoint(args: argparse.Namespace) -> int:
    """A sharded (FSDP2) training checkpoint's LoRA as the diffusers LoRA file that registration reads."""
    # lazy: a command loads its stage only when it runs (`umo --help` stays fast)
    from umo.train.loop import find_checkpoint
    from umo.train.sharded import convert_checkpoint

    checkpoint = args.checkpoint
    if (checkpoint / "checkpoints").is_dir():  # a run folder: its `latest`
        checkpoint = find_checkpoint(checkpoint, "latest")
        if checkpoint is None:
            raise FileNotFoundError(f"{args.checkpoint}: no checkpoint (no checkpoints/latest)")
    print(convert_checkpoint(checkpoint, args.out, ema=args.ema))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Base vs candidate LoRA (vs champion) on eval.benchmark, scored by the judge; writes the report folder."""
    # lazy: a command loads its stage only when it runs (`umo --help` stays fast)
    import torch.distributed as dist

    from umo.eval.run import evaluate

    config = load_config(args.params, args.overrides)
    settings = config.eval
    if args.scaling:  # the scaling set, with eval's other settings: compared with the base only
        scaling = config.eval.scaling
        if scaling.path is None:
            raise ValueError("--scaling: eval.scaling.path is null (no scaling set to evaluate)")
        settings = dataclasses.replace(config.eval, benchmark="xverse", path=scaling.path, root=None, max_items=None,
                                       images_per_item=scaling.images_per_item, out=scaling.out)
        if args.champion is not None:
            raise ValueError("--scaling: compares the candidate with the base only (no --champion)")
    lora, champion = args.lora, args.champion
    if "registry" in (str(lora), str(champion)):  # the registry's current champion, if any
        # lazy: a command loads its stage only when it runs (`umo --help` stays fast)
        from umo.registry import champion_lora

        registered = champion_lora(config.registry, config.tracking, tempfile.mkdtemp(prefix="umo-champion-"))
        log.info("champion from the registry: %s", registered or "none yet")
        if str(lora) == "registry":
            if registered is None:
                raise ValueError(f"--lora registry: {config.registry.model_name} has no champion yet")
            lora, champion = registered, None  # the champion IS the candidate: compared with the base only
        else:
            champion = registered
    try:
        result = evaluate(settings, generator=config.generator, faces=config.faces, lora=lora, champion=champion,
                          out=args.out)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        m = result.metrics
        print(json.dumps({name: {k: m[name][k] for k in ("id_sim", "id_conf", "id_match", "face_count_accuracy",
                                                        "items", "unscored")}
                          for name in m["models"]} | {"delta": m["delta"]}, indent=2))
        print(f"report: {result.out / 'report.md'}")
    return 0


def _record(args: argparse.Namespace, result: dict) -> None:
    """Print a stage's result as JSON; with --record also write it there (atomically: a DVC output)."""
    print(json.dumps(result, indent=2))
    if getattr(args, "record", None):
        args.record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.record, result)


def cmd_register(args: argparse.Namespace) -> int:
    """A training run + its evaluation report -> an MLflow model version (alias challenger)."""
    # lazy: a command loads its stage only when it runs (`umo --help` stays fast)
    from umo.registry import register
    from umo.package import serve_settings

    # A RegistryError is a ValueError: main() reports it in one line and exits 2.
    config = load_config(args.params, args.overrides)
    result = register(config.registry, config.tracking, serving=serve_settings(config), lora=config.lora,
                      train_dir=args.train, report=args.report, scaling=args.scaling_report)
    _record(args, {"model": result.name, "version": result.version, "run_id": result.run_id,
                   "created": result.created})
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    """The approval gate on a version (default: the challenger); exit 1 when it fails."""
    # lazy: a command loads its stage only when it runs (`umo --help` stays fast)
    from umo.registry import gate

    config = load_config(args.params, args.overrides)
    decision = gate(config.registry, config.tracking, version=args.version)  # RegistryError: exit 2
    _record(args, {"model": decision.name, "version": decision.version, "passed": decision.passed,
                   "approval": "pending" if decision.pending else config.registry.approval,
                   "champion_before": decision.previous_champion,
                   "rules": {r.name: ("pass: " if r.passed else "FAIL: ") + r.detail for r in decision.rules}})
    return 0 if decision.passed or args.exit_zero else 1


def cmd_approve(args: argparse.Namespace) -> int:
    """A person's answer on a version that passed the gate (registry.approval: human)."""
    # lazy: a command loads its stage only when it runs (`umo --help` stays fast)
    from umo.registry import approve

    config = load_config(args.params, args.overrides)
    result = approve(config.registry, config.tracking, version=args.version, approved=args.decision == "approve",
                     reason=args.reason, approver=args.approver)
    _record(args, {"model": result.name, "version": result.version, "approved": result.approved,
                   "reason": result.reason, "approver": result.approver, "champion": result.champion})
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    """Deploy the approved champion (or roll back, or verify what is deployed)."""
    # lazy: a command loads its stage only when it runs (`umo --help` stays fast)
    from umo.deploy import DeployError, clean_incomplete, deploy, rollback, verify_current
    from umo.registry import champion_version

    config = load_config(args.params, args.overrides)
    name = config.registry.model_name
    try:
        if args.clean_incomplete:
            n = clean_incomplete(config.deploy, name, target=args.target)
            print(f"{name}: {n} unfinished upload(s) removed")
            return 0
        if args.rollback:
            result = rollback(config.deploy, name, target=args.target)
        elif args.verify:
            result = verify_current(config.deploy, name, target=args.target)
        else:
            if args.none_ok and champion_version(config.registry, config.tracking) is None:
                reason = f"{name}: no approved champion (the gate passed no version): nothing deployed"
                print(reason)
                _record(args, {"model": name, "version": None, "location": None, "changed": False,
                               "reason": reason})
                return 0
            result = deploy(config.deploy, config.registry, config.tracking, version=args.version,
                            target=args.target)
    except DeployError as err:
        log.error("%s", err)
        return 1
    _record(args, {"model": result.model, "version": result.version, "location": result.location,
                   "changed": result.changed, "verified_by": result.verified_by})
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Images from a prompt and reference images with a LoRA (a path, a registry alias or the deployment)."""
    # lazy: a command loads its stage only when it runs (`umo --help` stays fast)
    from umo.deploy import DeployError
    from umo.generate import generate

    config = load_config(args.params, args.overrides)
    seeds = list(range(args.seed, args.seed + args.images))
    try:  # bad input (a missing reference, no face, too many) is a GenerationError: a ValueError, exit 2
        record = generate(config, lora=args.lora, prompt=args.prompt, references=args.reference, out=args.out,
                          seeds=seeds)
    except DeployError as err:
        log.error("%s", err)
        return 1
    print(json.dumps(record, indent=2))
    print(f"images: {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="umo",
        description="UMO multi-identity customization: data prep, ReReFL training with the matching reward, "
        "evaluation, registration and deployment. Every stage reads params.yaml.",
    )
    parser.add_argument("--version", action="version", version=f"umo {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("config", help="print the validated configuration (params.yaml + overrides)")
    add_config_args(p)
    p.add_argument("--schema", action="store_true", help="print the JSON Schema of params.yaml instead "
                   "(params.schema.json: `umo config --schema > params.schema.json`)")
    p.set_defaults(func=cmd_config)

    faces = sub.add_parser("faces", help="face pipeline utilities")
    faces_sub = faces.add_subparsers(dest="faces_command", metavar="ACTION", required=True)
    p = faces_sub.add_parser("detect", help="detect faces in images with the configured detector")
    add_config_args(p)
    p.add_argument("images", nargs="+", type=Path, help="image files")
    p.set_defaults(func=cmd_faces_detect)

    p = sub.add_parser("prepare", help="data prep: raw collection -> train/test manifests (DVC stage)")
    add_config_args(p)
    p.add_argument("--device", default="cpu", help="torch device of the face embedder and generator (default: cpu)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="ReReFL training of the LoRA (accelerate; resumable)")
    add_config_args(p)
    p.add_argument("--manifest", type=Path, required=True, help="train manifest written by `umo prepare`")
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoints/, lora/, train_metrics.json")
    p.add_argument("--resume", default=None, metavar="auto|latest|CHECKPOINT",
                   help="auto: continue the newest checkpoint in --out when it was trained on the same inputs "
                        "(settings, data, generator, reward models, code), else delete it and start over (the "
                        "DVC stage's); latest: continue the newest checkpoint in --out; or a checkpoint folder")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("convert-checkpoint", help="a sharded (FSDP2) checkpoint's LoRA -> the diffusers LoRA file")
    p.add_argument("checkpoint", type=Path, help="a checkpoint-<step> folder, or a run folder (its latest)")
    p.add_argument("--out", type=Path, required=True, help="folder for pytorch_lora_weights.safetensors")
    p.add_argument("--ema", action="store_true", help="the EMA's weights (what the run exports when the EMA is on)")
    p.set_defaults(func=cmd_convert_checkpoint)

    p = sub.add_parser("evaluate", help="benchmark evaluation: base vs a LoRA, same seeds, judge scores, report")
    add_config_args(p)
    p.add_argument("--lora", type=Path, required=True,
                   help="the candidate LoRA: pytorch_lora_weights.safetensors or a folder holding it; "
                   "`registry`: the registry's champion (its re-evaluation against the base)")
    p.add_argument("--champion", type=Path, default=None,
                   help="the current champion's LoRA, compared too; `registry`: the registry's champion, if any")
    p.add_argument("--out", type=Path, default=None, help="report folder (default: eval.out, or eval.scaling.out)")
    p.add_argument("--scaling", action="store_true",
                   help="evaluate eval.scaling's set (more and more people per item) instead of eval.benchmark")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("register", help="register a trained LoRA with its evaluation in the MLflow registry")
    add_config_args(p)
    p.add_argument("--train", type=Path, required=True, help="the training run folder (`umo train --out`)")
    p.add_argument("--report", type=Path, required=True, help="its evaluation report folder (`umo evaluate`)")
    p.add_argument("--scaling-report", type=Path, default=None,
                   help="its scaling set's report (`umo evaluate --scaling`), logged as evidence (never gated)")
    p.add_argument("--record", type=Path, default=None, help="also write the result JSON here")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("gate", help="the approval gate: registry.gate policy -> champion alias (exit 1: failed)")
    add_config_args(p)
    p.add_argument("--version", default=None, help="model version (default: the challenger)")
    p.add_argument("--record", type=Path, default=None, help="also write the decision JSON here")
    p.add_argument("--exit-zero", action="store_true", help="exit 0 when the gate refuses (the decision is the "
                   "output; for pipelines that go on to deploy whatever is champion)")
    p.set_defaults(func=cmd_gate)

    p = sub.add_parser("approve", help="a person's answer on a version the gate passed (registry.approval: human)")
    add_config_args(p)
    p.add_argument("--version", required=True, help="the model version (the gate passed it)")
    p.add_argument("--decision", required=True, choices=("approve", "reject"))
    p.add_argument("--reason", required=True, help="why (kept as the version's tag approval.reason)")
    p.add_argument("--approver", default=os.environ.get("USER", "unknown"), help="who (default: $USER)")
    p.add_argument("--record", type=Path, default=None, help="also write the answer JSON here")
    p.set_defaults(func=cmd_approve)

    p = sub.add_parser("deploy", help="deploy the approved champion to deploy.target (S3 or a folder)")
    add_config_args(p)
    p.add_argument("--version", default=None, help="must be the champion (default: the champion)")
    p.add_argument("--target", default=None, help="s3://bucket/prefix or a folder (default: deploy.target)")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--rollback", action="store_true", help="point current.json back at the previous version")
    action.add_argument("--verify", action="store_true", help="verify what current.json points at")
    action.add_argument("--clean-incomplete", action="store_true",
                        help="abort the unfinished multipart uploads a killed deploy left under the model's prefix")
    p.add_argument("--record", type=Path, default=None, help="also write the result JSON here")
    p.add_argument("--none-ok", action="store_true",
                   help="no champion yet (every version refused): say so, record it and exit 0 (the chain's stage)")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("generate", help="generate images from a prompt and reference images with a trained LoRA")
    add_config_args(p)
    p.add_argument("--lora", required=True, metavar="PATH|ALIAS|deployed|s3://...",
                   help="a LoRA file or folder (a package's config.json beside it is used); a registry alias of "
                        "registry.model_name (champion, challenger, previous) or models:/<name>@<alias>, "
                        "models:/<name>/<version>; `deployed` (deploy.target) or s3://bucket/prefix: the deployed "
                        "version, verified")
    p.add_argument("--prompt", required=True, help="what to draw, e.g. 'two people on a beach'")
    p.add_argument("--reference", type=Path, action="append", required=True, metavar="IMAGE",
                   help="one reference image per person, each showing that person's face (repeat the option)")
    p.add_argument("--out", type=Path, required=True, help="folder for <k>.png and generation.json (replaced whole)")
    p.add_argument("--images", type=int, default=1, help="how many images (seeds --seed, --seed + 1, ...)")
    p.add_argument("--seed", type=int, default=0, help="the first seed (default 0)")
    p.set_defaults(func=cmd_generate)

    for extension in extensions():  # e.g. the toy world's commands (umo.toy.extension)
        extension.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    failures.raise_on_sigterm()
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        # Bad input is the user's to fix: one clear line, no traceback.
        failures.record(err)
        log.error("%s", err)
        return 2
    except BaseException as err:
        # The orchestrator decides a retry from this record (umo.failures), never from the log's words.
        if not isinstance(err, (SystemExit, KeyboardInterrupt)):
            failures.record(err)
        raise


if __name__ == "__main__":
    sys.exit(main())
