"""The MLflow model registry: register a trained LoRA with its evidence, and the approval gate.

`register` turns a training run plus its evaluation report into a model version of `registry.model_name`:
- in the training run (a new run when training was not tracked): the model, logged from code (umo/mlflow_model.py,
  umo.serve.UmoLoraModel: prompts and base64 reference images -> images) with umo's sources as its code_paths,
  pinned requirements, a signature and an input example; its artifacts are the LoRA (safetensors), config.json
  (how it generates: umo.package.ServeSettings) and a model card (umo.card);
- the evaluation metrics as `eval.<model>.<metric>` on the run and on that LoggedModel, each tied to the data set
  it was measured on (also the run's evaluation input), the report (report.md, metrics.json, the comparison grids)
  under `evaluation/`, lineage tags (git commit, DVC hashes, the train stage's dvc.lock hash);
- a model version with tags (git commit, DVC hashes of data and params, base model, toy-world flag, LoRA sha256,
  evaluation metrics), a readable description, and the alias `challenger`.
Registering the same LoRA from the same run again returns the existing version (tag `umo.lora_sha256`).

`gate` applies `registry.gate` to a version: against the base (the report's base column) and the current
`champion` (the report's champion column, i.e. the same seeds). It refuses empty evidence: a compared model whose
images the judge found no face in, fewer scored references than `min_scored_references`, or a metric the report
lacks for either side of a rule fails (`rules`). The decision and each rule's outcome are version tags
(`gate.decision`, `gate.rule.<name>`); on pass the alias `champion` moves to the version and the version that held
it gets `previous`. With `registry.approval: human` a passed version waits (`approval.status` = pending) until a
person answers (`approve`: the answer, reason and approver become version tags, and an approval moves
`champion`). The gate and `approve` are the only code that sets `champion` (`_promote`).

mlflow is imported here, in umo.tracking and by the served model (umo.serve, umo/mlflow_model.py). Credentials stay in the environment (MLFLOW_TRACKING_TOKEN,
..., read by MLflow itself); URIs are logged without them.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import packages_distributions, version
from pathlib import Path

import mlflow
import pandas as pd
import yaml
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array
from PIL import Image

from umo import __version__
from umo.card import evaluation_table, model_card
from umo.config import GeneratorConfig, LoraConfig, RegistryConfig, TrackingConfig, to_dict
from umo.io import dvc_dir_md5, sha256_file, shared_path
from umo.families import FAMILIES, family_slug, folder_family
from umo.package import LORA_FILE, SETTINGS_FILE, ServeSettings, lora_file
from umo.tracking import (DEFAULT_SPOOL, dataset_input, flatten, git_commit, redact_uri, replay_spool, source_tags,
                          tracking_uri)

log = logging.getLogger(__name__)

CHALLENGER, CHAMPION, PREVIOUS = "challenger", "champion", "previous"
MODEL_ARTIFACT = "umo_lora"
CONFIG_FILE, CARD_FILE = SETTINGS_FILE, "MODEL_CARD.md"
LORA_SHA_TAG = "umo.lora_sha256"
FAMILY_TAG = "umo.generator.family"  # on the registered model and each version: the base it was trained on
DECISION_TAG = "gate.decision"
APPROVAL_TAG = "approval.status"  # registry.approval human: pending, approved or rejected (a person's answer)


class RegistryError(ValueError):
    """A registration or gate request that cannot be honoured (the message says why)."""


@dataclass
class Registered:
    name: str
    version: str
    run_id: str
    created: bool  # False: this LoRA from this run was registered before; that version is returned


@dataclass
class Rule:
    name: str
    passed: bool
    detail: str


@dataclass
class GateDecision:
    name: str
    version: str
    passed: bool
    rules: list[Rule] = field(default_factory=list)
    previous_champion: str | None = None
    pending: bool = False  # passed, and waits for a person's approval (registry.approval: human)


def client_for(tracking: TrackingConfig):
    uri = tracking_uri(tracking.tracking_uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextmanager
def _fluent_at(uri: str):
    """mlflow's fluent API (start_run, log_model, register_model) at `uri` for the block. set_tracking_uri also
    exports MLFLOW_TRACKING_URI for child processes: the caller's own value is put back after, so that a
    registration never redirects the runs that the caller's process starts later."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # back to mlflow's default: the environment variable, read when needed
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before


# ------------------------------------------------------------------------------------------------ lineage


def dvc_hashes(root: Path = Path(".")) -> dict[str, str]:
    """The data's DVC hash (data.dvc's md5) and params.yaml's md5 (DVC's file hash)."""
    out = {}
    data = root / "data.dvc"
    if data.is_file():
        outs = yaml.safe_load(data.read_text()).get("outs") or [{}]
        out["dvc.data_md5"] = str(outs[0].get("md5", "unknown"))
    params = root / "params.yaml"
    if params.is_file():
        out["dvc.params_md5"] = hashlib.md5(params.read_bytes()).hexdigest()
    return out


def dvc_stage_hash(stage: str, produced: Path) -> str | None:
    """The md5 of `stage`'s entry in the dvc.lock of the DVC project holding `produced` (the nearest dvc.lock
    above it): the stage's command, the hashes of its dependencies, params and outputs. Only when that entry's
    output at `produced` holds exactly what `produced` holds now; None otherwise (no dvc.lock, no such stage, or the
    folder was made by another run than the one dvc.lock records)."""
    produced = produced.resolve()
    root = next((d for d in produced.parents if (d / "dvc.lock").is_file()), None)
    if root is None or not produced.is_dir():
        return None
    entry = (yaml.safe_load((root / "dvc.lock").read_text()).get("stages") or {}).get(stage)
    if not entry:
        return None
    out = next((o for o in entry.get("outs", []) if (root / o["path"]).resolve() == produced), None)
    if out is None or out.get("md5") != dvc_dir_md5(produced):
        return None
    return hashlib.md5(json.dumps(entry, sort_keys=True).encode()).hexdigest()


def _train_run_id(train_dir: Path) -> str | None:
    pointer = train_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    state = train_dir / "checkpoints" / pointer.read_text().strip() / "train_state.json"
    return json.loads(state.read_text()).get("mlflow_run_id") if state.is_file() else None


def _read_report(report: Path, lora_sha: str) -> dict:
    path = report / "metrics.json"
    if not path.is_file():
        raise RegistryError(f"{path}: no evaluation report (run `umo evaluate` on this LoRA first)")
    metrics = json.loads(path.read_text())
    candidate = (metrics.get("models") or {}).get("candidate") or {}
    if candidate.get("sha256") != lora_sha:
        raise RegistryError(f"{path}: the report evaluated another LoRA (sha256 {candidate.get('sha256')}, this "
                            f"one {lora_sha}); evaluate this LoRA first")
    return metrics


# ------------------------------------------------------------------------------------------------ register


def register(registry: RegistryConfig, tracking: TrackingConfig, *, serving: ServeSettings, lora: LoraConfig,
             train_dir: str | Path, report: str | Path, scaling: str | Path | None = None) -> Registered:
    """Register the LoRA of a training run folder (`umo train --out`) with its evaluation report folder (and its
    scaling set's report, logged beside it as evidence; the gate never reads it). `serving` (how the model
    generates) goes into the version's config.json; the LoRA settings into its model card."""
    train_dir, report = Path(train_dir), Path(report)
    lora_path = lora_file(train_dir / "lora")
    sha = sha256_file(lora_path)
    metrics = _read_report(report, sha)
    scaling_metrics = None
    if scaling is not None:
        scaling = Path(scaling)
        scaling_metrics = _read_report(scaling, sha)  # the same LoRA, or a clear error
    name = registry.model_name
    client = client_for(tracking)
    family = generator_family(serving.generator)
    _check_family(client, name, family)
    run_id = _train_run_id(train_dir)
    if run_id is not None:  # what training logged while the server was away, sent before the run is read
        left = replay_spool(client.tracking_uri, shared_path(DEFAULT_SPOOL) / f"{run_id}.jsonl")
        if left:
            # a ConnectionError: transient (umo.failures), the orchestrator retries the stage later
            raise ConnectionError(f"run {run_id}: {left} tracking record(s) of its training could not be sent to "
                                  f"{redact_uri(client.tracking_uri)} yet (is the server up?); register again later")

    existing = _find_version(client, name, sha, run_id)
    if existing is not None:
        if _logged_report(client, existing.run_id) == metrics:
            log.info("%s version %s already holds this LoRA and this report (run %s): nothing to do", name,
                     existing.version, existing.run_id)
        else:  # a newer evaluation of the same LoRA (e.g. with the champion's column): refresh the evidence
            lineage = {k: v for k, v in existing.tags.items() if not k.startswith(("eval.", "gate."))}
            _log_evidence(client, existing.run_id, metrics, report, scaling, scaling_metrics,
                          model_id=logged_model_id(existing))
            for k, v in _metric_tags(metrics).items():
                client.set_model_version_tag(name, existing.version, k, v)
            client.update_model_version(name, existing.version,
                                        description=_description(metrics, lineage, existing.run_id))
            log.info("%s version %s: evaluation evidence replaced by %s", name, existing.version, report)
        return Registered(name, existing.version, existing.run_id, created=False)

    if run_id is None:
        experiment = client.get_experiment_by_name(tracking.experiment)
        exp_id = experiment.experiment_id if experiment else client.create_experiment(tracking.experiment)
        run_id = client.create_run(exp_id, run_name=f"register-{sha[:8]}",
                                   tags={"umo.stage": "register", **source_tags("umo register")}).info.run_id
    lineage = {"git_commit": git_commit(), **dvc_hashes(), "base_model": _base_model(serving.generator),
               "toy_world": str(bool(metrics.get("toy_world"))).lower(), LORA_SHA_TAG: sha,
               "eval.benchmark": str(metrics.get("benchmark")), FAMILY_TAG: family}
    stage_hash = dvc_stage_hash("train", train_dir / "lora")
    if stage_hash is not None:  # the DVC stage run that made this LoRA (dvc.lock's entry, verified against it)
        lineage["dvc.stage.train.md5"] = stage_hash
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in lineage.items()])

    uri = tracking_uri(tracking.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        settings = {"umo_version": __version__, "serving": serving.to_dict(), "lora": to_dict(lora),
                    "lineage": lineage}
        card = model_card(name, base_model=registry.hub_base_model, family=family, lora=lora,
                          metrics=metrics, lineage=lineage, license=registry.license)
        files = _model_files(Path(tmp), settings, str(card), lora_path)
        with _fluent_at(uri):
            info = _log_pyfunc(run_id, files, Path(tmp), _input_example(metrics, serving))
    _log_evidence(client, run_id, metrics, report, scaling, scaling_metrics, model_id=info.model_id)
    _ensure_registered_model(client, name, family)

    with _fluent_at(uri):
        version = mlflow.register_model(info.model_uri, name, tags=lineage | _metric_tags(metrics))
    client.update_model_version(name, version.version, description=_description(metrics, lineage, run_id))
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    log.info("registered %s version %s (alias %s) from run %s at %s", name, version.version, CHALLENGER, run_id,
             redact_uri(tracking_uri(tracking.tracking_uri)))
    return Registered(name, str(version.version), run_id, created=True)


def logged_model_id(mv) -> str | None:
    """The LoggedModel a model version was registered from: its model_id, or read from its source
    (`models:/<model_id>`), which is all the REST API returns on some stores."""
    if getattr(mv, "model_id", None):
        return mv.model_id
    source = str(mv.source or "")
    found = re.fullmatch(r"models:/(m-[0-9a-f]+)", source)
    return found.group(1) if found else None


def _find_version(client, name: str, sha: str, run_id: str | None):
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    for v in sorted(versions, key=lambda v: int(v.version)):
        if v.tags.get(LORA_SHA_TAG) == sha and (run_id is None or v.run_id == run_id):
            return v
    return None


def generator_family(generator: GeneratorConfig) -> str:
    """The family a LoRA was trained on: generator.family, or its folder's (family auto)."""
    return folder_family(generator.path) if generator.family == "auto" else generator.family


def _check_family(client, name: str, family: str) -> None:
    """One registered model holds the LoRAs of one family (a champion of another family is no baseline, and its
    deployment would not load): RegistryError where `name` already holds another family's versions, or names
    another family."""
    try:
        held = client.get_registered_model(name).tags.get(FAMILY_TAG)
    except MlflowException:
        held = None
    named = [f for f in FAMILIES if f != family and family_slug(f) in name]
    if (held and held != family) or named:
        raise RegistryError(f"registry.model_name {name!r} is for {held or named[0]} LoRAs, this one was trained on "
                            f"{family}: set registry.model_name, e.g. umo-{family_slug(family)}-lora")


def _ensure_registered_model(client, name: str, family: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, tags={FAMILY_TAG: family}, description=(
            "UMO multi-identity LoRAs (ReReFL with the matching reward). Each version carries its evaluation "
            "(base vs candidate, judge scores), lineage tags and a model card. Aliases: `challenger` = newest "
            "registered, `champion` = approved by the gate (the one deployed), `previous` = the champion before."))


def _base_model(generator: GeneratorConfig) -> str:
    """family:path of the base generator, plus its model_index.json's sha256 (a weights-free fingerprint)."""
    index = Path(generator.path) / "model_index.json"
    digest = sha256_file(index)[:12] if index.is_file() else "unknown"
    return f"{generator_family(generator) if index.is_file() else generator.family}:{generator.path}@{digest}"


def _metric_tags(metrics: dict) -> dict[str, str]:
    return {f"eval.{m}.{k}": str(metrics[m][k]) for m in ("base", "candidate", "champion") if m in metrics
            for k in ("id_sim", "id_conf", "id_match", "face_count_accuracy", "unscored", "images_scored",
                      "faces_scored", "references_scored") if k in metrics[m]}


def _numeric(metrics: dict) -> dict[str, float]:
    """The report's numbers as MLflow metrics: eval.<model>.<metric>[.by_identities.<n>.<metric>]."""
    out = {}
    for m in ("base", "candidate", "champion", "delta", "delta_vs_champion"):
        for k, v in flatten(metrics.get(m) or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"eval.{m}.{k}"] = float(v)
    for judge, r in (metrics.get("judges") or {}).items():  # eval.judge.<name>.candidate.id_sim ...: every judge
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", judge)
        for m in ("base", "candidate", "champion"):
            for k in ("id_sim", "id_conf", "face_count_accuracy", "collision_rate"):
                if isinstance((r.get(m) or {}).get(k), (int, float)):
                    out[f"eval.judge.{name}.{m}.{k}"] = float(r[m][k])
        for pair, by_key in (r.get("paired") or {}).items():
            for key, ci in by_key.items():
                for part in ("lower", "upper"):
                    if ci and ci.get(part) is not None:
                        out[f"eval.judge.{name}.paired.{pair.replace(' - ', '_vs_')}.{key}.{part}"] = float(ci[part])
    for pair, by_key in (metrics.get("paired") or {}).items():  # eval.paired.candidate_vs_base.id_sim.lower ...
        for key, r in by_key.items():
            for part in ("difference", "lower", "upper"):
                if r and r.get(part) is not None:
                    out[f"eval.paired.{pair.replace(' - ', '_vs_')}.{key}.{part}"] = float(r[part])
    return out


def _log_evidence(client, run_id: str, metrics: dict, report: Path, scaling: Path | None = None,
                  scaling_metrics: dict | None = None, *, model_id: str | None = None) -> None:
    """The report's numbers as metrics of the run and of the LoggedModel `model_id` (its page lists them), each
    tied to the data set it was measured on; that set as the run's evaluation input; the report's files."""
    now = int(time.time() * 1000)

    def on(dataset: dict | None) -> dict:
        return {"model_id": model_id, **({"dataset_name": dataset["name"], "dataset_digest": dataset["digest"]}
                                         if dataset else {})}

    held_out = metrics.get("dataset")
    items = [Metric(k, v, now, 0, **on(held_out)) for k, v in _numeric(metrics).items()]
    datasets = [held_out] if held_out else []
    if scaling is not None:  # eval.scaling.<model>.by_identities.<n>.<metric>: the scaling curves
        numbers = _numeric(scaling_metrics)
        items += [Metric(f"eval.scaling.{k[len('eval.'):]}", v, now, 0, **on(scaling_metrics.get("dataset")))
                  for k, v in numbers.items() if ".by_identities." in k and not k.startswith("eval.delta")]
        datasets += [scaling_metrics["dataset"]] if scaling_metrics.get("dataset") else []
        for f in ("report.md", "metrics.json", "by_identities.png"):
            if (scaling / f).is_file():
                client.log_artifact(run_id, str(scaling / f), "evaluation/scaling")
    if datasets:
        client.log_inputs(run_id, datasets=[dataset_input(d, "evaluation") for d in datasets])
    for i in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[i:i + 500])
    for f in ("report.md", "metrics.json"):
        client.log_artifact(run_id, str(report / f), "evaluation")
    if (report / "grids").is_dir():
        client.log_artifacts(run_id, str(report / "grids"), "evaluation/grids")
        # the matching of those items (most improved, most regressed), per model; the report folder has them all
        for grid in sorted((report / "grids").glob("*.png")):
            stem = grid.name.split("-", 2)[2]  # <improved|regressed>-<k>-<item stem>.png
            for picture in sorted((report / "matching").glob(f"*/{stem}")):
                client.log_artifact(run_id, str(picture), f"evaluation/matching/{picture.parent.name}")


def _model_files(tmp: Path, settings: dict, card: str, lora: Path) -> dict[str, Path]:
    (tmp / CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    (tmp / CARD_FILE).write_text(card)
    return {"lora": lora, "config": tmp / CONFIG_FILE, "model_card": tmp / CARD_FILE}


SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.string, "prompt"), ColSpec(Array(DataType.string), "references"),
                   ColSpec(DataType.long, "seed", required=False)]),
    outputs=Schema([ColSpec(DataType.string, "image")]))
# what the served model imports (umo's serving code and its libraries): its pip requirements, pinned to this
# environment's versions (import name -> distribution through the installed metadata)
SERVING_IMPORTS = ("torch", "numpy", "pandas", "PIL", "yaml", "ruamel.yaml", "safetensors", "diffusers",
                   "transformers", "peft", "accelerate", "onnx", "onnxruntime", "insightface", "cv2", "mlflow")
EXAMPLE_BYTES = 256 * 1024  # a reference of the input example above this is re-encoded smaller


def _log_pyfunc(run_id: str, files: dict[str, Path], tmp: Path, example: pd.DataFrame | None):
    """The pyfunc, logged from code (umo/mlflow_model.py) with umo's own sources as its code_paths (the toy world
    left out), its requirements, signature and input example. MLflow checks the example by running the model
    once. Returns MLflow's ModelInfo (model_uri, model_id)."""
    package = Path(__file__).resolve().parent
    code = tmp / "code" / "umo"
    for src in sorted(package.rglob("*.py")):
        rel = src.relative_to(package)
        if rel.parts[0] != "toy":
            (code / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, code / rel)
    with mlflow.start_run(run_id=run_id):
        return mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT, python_model=str(package / "mlflow_model.py"), code_paths=[str(code)],
            artifacts={k: str(v) for k, v in files.items()}, signature=SIGNATURE, input_example=example,
            pip_requirements=serving_requirements())


def serving_requirements() -> list[str]:
    """The distributions of SERVING_IMPORTS at this environment's versions (`name==version`, local build tags
    such as +cpu dropped: pip finds the build its platform needs)."""
    owners = packages_distributions()
    out = {}
    for module in SERVING_IMPORTS:
        for dist in owners.get(module.split(".")[0], []):
            if module == "ruamel.yaml" and dist != "ruamel.yaml":
                continue
            out[dist.lower()] = f"{dist}=={version(dist).split('+')[0]}"
    return sorted(out.values())


def _input_example(metrics: dict, serving: ServeSettings) -> pd.DataFrame | None:
    """One request in the served model's format: the evaluated set's first item (its prompt, its references as
    base64 image files, a seed). None, with a warning, when those files are not here."""
    example = (metrics.get("dataset") or {}).get("example")
    paths = [Path(p) for p in (example or {}).get("references", [])][:serving.max_references]
    if not paths or not all(p.is_file() for p in paths):
        log.warning("the report's example references are not here (%s): the model is logged without an input "
                    "example", paths or "none recorded")
        return None
    refs = []
    for path in paths:
        data = path.read_bytes()
        if len(data) > EXAMPLE_BYTES:
            with Image.open(path) as im:
                im = im.convert("RGB")
                im.thumbnail((256, 256))
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                data = buf.getvalue()
        refs.append(base64.b64encode(data).decode())
    return pd.DataFrame({"prompt": [example["prompt"]], "references": [refs], "seed": [0]})


def _description(metrics: dict, lineage: dict, run_id: str) -> str:
    toy = metrics.get("toy_world")
    head = ("**Toy world**: trained and evaluated on the offline synthetic world with tiny models; it shows that "
            "the chain works, not a usable model.\n\n") if toy else ""
    return (f"{head}LoRA for `{lineage['base_model']}`, ReReFL with the multi-identity matching reward "
            f"(training run `{run_id}`).\n\nEvaluation on `{metrics.get('benchmark')}` "
            f"({metrics.get('images_per_item')} images per item, shared seeds; judge ≠ reward model):\n\n"
            f"{evaluation_table(metrics)}\n\nLineage: git `{lineage['git_commit']}`, data md5 "
            f"`{lineage.get('dvc.data_md5', 'unknown')}`, params md5 `{lineage.get('dvc.params_md5', 'unknown')}`, "
            f"LoRA sha256 `{lineage[LORA_SHA_TAG][:16]}…`. Approval: see the `gate.*` tags.")


# ------------------------------------------------------------------------------------------------ the gate


def gate(registry: RegistryConfig, tracking: TrackingConfig, *, version: str | None = None) -> GateDecision:
    """Decide on `version` (default: the `challenger`) of registry.model_name by the registry.gate policy; see the
    module docstring."""
    client = client_for(tracking)
    name = registry.model_name
    mv = client.get_model_version_by_alias(name, CHALLENGER) if version is None else \
        client.get_model_version(name, str(version))
    metrics = _version_report(client, mv)
    champion = _alias_version(client, name, CHAMPION)
    decision = GateDecision(name, str(mv.version), False,
                            previous_champion=str(champion.version) if champion else None)
    decision.rules = rules(registry.gate, metrics,
                           champion_sha=None if champion is None or champion.version == mv.version
                           else champion.tags.get(LORA_SHA_TAG))
    decision.passed = all(r.passed for r in decision.rules)
    for r in decision.rules:
        client.set_model_version_tag(name, mv.version, f"gate.rule.{r.name}",
                                     f"{'pass' if r.passed else 'fail'}: {r.detail}"[:5000])
    client.set_model_version_tag(name, mv.version, "gate.policy", json.dumps(to_dict(registry.gate)))
    client.set_model_version_tag(name, mv.version, DECISION_TAG, "passed" if decision.passed else "failed")
    if decision.passed and registry.approval == "human":
        decision.pending = mv.tags.get(APPROVAL_TAG) not in ("approved", "rejected")
        if decision.pending:
            client.set_model_version_tag(name, mv.version, APPROVAL_TAG, "pending")
        elif mv.tags.get(APPROVAL_TAG) == "approved":  # a person approved this version before: it stays approved
            _promote(client, name, mv.version, champion)
    elif decision.passed:
        _promote(client, name, mv.version, champion)
    log.info("gate %s version %s: %s (%s)", name, mv.version, "PASSED" if decision.passed else "FAILED",
             "; ".join(f"{r.name} {'ok' if r.passed else 'FAILED'}: {r.detail}" for r in decision.rules))
    return decision


@dataclass
class Approval:
    name: str
    version: str
    approved: bool
    reason: str
    approver: str
    champion: str | None  # the version holding `champion` afterwards


def approve(registry: RegistryConfig, tracking: TrackingConfig, *, version: str, approved: bool, reason: str,
            approver: str) -> Approval:
    """A person's answer on a version the gate passed (registry.approval: human). The answer, the reason and the
    approver become version tags (approval.status, approval.reason, approval.approver, approval.time); an
    approval moves `champion` to the version. A version the gate did not pass cannot be approved."""
    if not reason.strip():
        raise RegistryError("an approval needs a reason (it is kept on the model version)")
    client = client_for(tracking)
    name = registry.model_name
    mv = client.get_model_version(name, str(version))
    if mv.tags.get(DECISION_TAG) != "passed":
        raise RegistryError(f"{name} version {mv.version}: the gate did not pass it ({DECISION_TAG} = "
                            f"{mv.tags.get(DECISION_TAG)}); only a version that passed can be approved")
    status = "approved" if approved else "rejected"
    tags = {APPROVAL_TAG: status, "approval.reason": reason.strip()[:5000], "approval.approver": approver or "unknown",
            "approval.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for key, value in tags.items():
        client.set_model_version_tag(name, mv.version, key, value)
    if approved:
        _promote(client, name, mv.version, _alias_version(client, name, CHAMPION))
    champion = _alias_version(client, name, CHAMPION)
    log.info("%s version %s %s by %s: %s", name, mv.version, status, tags["approval.approver"], tags["approval.reason"])
    return Approval(name, str(mv.version), approved, tags["approval.reason"], tags["approval.approver"],
                    None if champion is None else str(champion.version))


def rules(policy, metrics: dict, *, champion_sha: str | None) -> list[Rule]:
    """Each rule of the policy on a report's metrics.json (pure: no MLflow).

    Empty evidence is a refusal, never a pass: the evidence rules (`faces_scored`: the judge found faces in the
    images of every compared model; `references_scored`: at least `min_scored_references` scored) come first, and a
    comparison whose metric the report lacks for either side fails, naming the side.

    >>> from umo.config import GateConfig
    >>> seen = {"images_scored": 8, "faces_scored": 16, "references_scored": 16, "unscored": 0}
    >>> m = {"base": {"id_sim": 10.0, "id_conf": 50.0, "face_count_accuracy": 0.5, "copy_paste": 0.3,
    ...               "collision_rate": 0.1, **seen},
    ...      "candidate": {"id_sim": 12.0, "id_conf": 49.0, "face_count_accuracy": 0.5, "copy_paste": 0.4,
    ...                    "collision_rate": 0.12, **seen}}
    >>> point = GateConfig(min_id_sim_gain=1.0, max_id_conf_drop=0.5, use_intervals=False)
    >>> [(r.name, r.passed) for r in rules(point, m, champion_sha=None)]  # doctest: +NORMALIZE_WHITESPACE
    [('faces_scored', True), ('references_scored', True), ('id_sim', True), ('id_conf', False),
     ('face_count', True), ('all_scored', True), ('copy_paste', False), ('collapse', True)]

    With intervals (the default), the same +2 ID-Sim is no evidence when its interval reaches below delta, and the
    -1 ID-Conf no refusal when its interval reaches above -epsilon:

    >>> ci = lambda d, lo, hi: {"difference": d, "lower": lo, "upper": hi, "level": 0.95, "items": 4}
    >>> m["paired"] = {"candidate - base": {"id_sim": ci(2.0, 0.5, 3.5), "id_conf": ci(-1.0, -4.0, 2.0),
    ...                                     "face_count_accuracy": ci(0.0, -0.1, 0.1)}}
    >>> [(r.name, r.passed) for r in rules(GateConfig(min_id_sim_gain=1.0, max_id_conf_drop=0.5), m,
    ...                                    champion_sha=None)][2:4]
    [('id_sim', False), ('id_conf', True)]
    """
    base, cand = metrics["base"], metrics["candidate"]
    compared = {"candidate": cand, "base": base}
    champion_column = None
    if champion_sha is not None:
        reported = ((metrics.get("models") or {}).get("champion") or {}).get("sha256")
        if reported == champion_sha:
            champion_column = compared["champion"] = metrics["champion"]
    out = _evidence(policy, compared)
    paired = (metrics.get("paired") or {}) if policy.use_intervals else None

    def compare(name: str, key: str, margin: float, against: str, bound: str) -> Rule:
        rule = _at_least(name, cand.get(key), compared[against].get(key), margin, against)
        if paired is None or cand.get(key) is None or compared[against].get(key) is None:
            return rule  # point estimates decide, or nothing to compare (fails, naming the side)
        return _interval_at_least(name, (paired.get(f"candidate - {against}") or {}).get(key), margin, bound,
                                  against)

    out += [compare("id_sim", "id_sim", policy.min_id_sim_gain, "base", "lower"),
            compare("id_conf", "id_conf", -policy.max_id_conf_drop, "base", "upper")]
    if policy.face_count_not_lower:
        out.append(compare("face_count", "face_count_accuracy", 0.0, "base", "upper"))
    if policy.require_all_scored:
        n = cand.get("unscored")
        out.append(Rule("all_scored", False, "the number of unscored items is not recorded for the candidate")
                   if n is None else Rule("all_scored", n == 0, f"{n} evaluation items unscored"))
    if champion_sha is not None:
        if champion_column is None:
            out.append(Rule("champion", False, "the report has no column for the current champion's LoRA "
                                               "(evaluate with --champion)"))
        else:
            out.append(compare("champion", "id_sim", policy.champion_margin, "champion", "lower"))
    # lower is better: a rise beyond the margin that the data show refuses (with intervals: the rise's lower bound)
    for name, key, margin in (("copy_paste", "copy_paste", policy.max_copy_paste_rise),
                              ("collapse", "collision_rate", policy.max_collapse_rise)):
        if margin is None:
            continue
        for against in ("base", "champion") if champion_column is not None else ("base",):
            rule = _at_most(name, cand.get(key), compared[against].get(key), margin, against)
            if paired is not None and cand.get(key) is not None and compared[against].get(key) is not None:
                rule = _interval_at_most(name, (paired.get(f"candidate - {against}") or {}).get(key), margin,
                                         against)
            out.append(rule)
    return out


def _evidence(policy, compared: dict[str, dict]) -> list[Rule]:
    """The two evidence rules on the report columns the decision rests on (name -> column): faces found, and
    enough (item, image, reference) entries scored. A count the report does not record is missing evidence."""
    faces, faces_ok, refs, refs_ok = [], True, [], True
    for name, col in compared.items():
        n_faces, n_images, n_refs = col.get("faces_scored"), col.get("images_scored"), col.get("references_scored")
        if n_faces is None:
            faces_ok = False
            faces.append(f"the report does not record how many faces the judge found for the {name} (evaluate it "
                         "again)")
        elif n_faces == 0:
            faces_ok = False
            faces.append(f"no faces scored: the judge found 0 faces in the {name}'s {n_images} images")
        else:
            faces.append(f"the judge found {n_faces} faces in the {name}'s {n_images} images")
        if n_refs is None:
            refs_ok = False
            refs.append(f"the report does not record how many references were scored for the {name} (evaluate it "
                        "again)")
        elif n_refs < policy.min_scored_references:
            refs_ok = False
            refs.append(f"too few scored references: {n_refs} (item, image, reference) scored for the {name}, "
                        f"fewer than min_scored_references {policy.min_scored_references}")
        else:
            refs.append(f"{n_refs} references scored for the {name} (at least {policy.min_scored_references})")
    return [Rule("faces_scored", faces_ok, "; ".join(faces)), Rule("references_scored", refs_ok, "; ".join(refs))]


def _at_least(name: str, value, reference, margin: float, against: str) -> Rule:
    """value >= reference + margin; a side without a value fails (no comparison can be made, so no pass)."""
    if value is None:
        both = "" if reference is not None else f" nor for the {against}"
        return Rule(name, False, f"not measured for the candidate{both}")
    if reference is None:
        return Rule(name, False, f"measured for the candidate ({value:.4g}) but not for the {against}: nothing to "
                                 "compare with")
    ok = value >= reference + margin - 1e-9
    return Rule(name, ok, f"candidate {value:.4g} {'>=' if ok else '<'} {against} {reference:.4g} "
                          f"{'+' if margin >= 0 else '-'} {abs(margin):g}")


def _at_most(name: str, value, reference, margin: float, against: str) -> Rule:
    """value <= reference + margin (a rise of at most `margin`); a side without a value fails."""
    rule = _at_least(name, None if value is None else -value, None if reference is None else -reference, -margin,
                     against)
    if value is None or reference is None:
        return rule
    return Rule(name, rule.passed, f"candidate {value:.4g} {'<=' if rule.passed else '>'} {against} "
                                   f"{reference:.4g} + {margin:g}")


def _interval_at_most(name: str, interval: dict | None, margin: float, against: str) -> Rule:
    """The paired interval of candidate - `against` decides a rise: its LOWER bound (the least rise the data
    show) <= margin. A report without the interval fails."""
    if not interval:
        return Rule(name, False, f"the report has no paired interval of candidate - {against} (evaluate again, or "
                                 "set registry.gate.use_intervals: false)")
    d, lo, hi = interval["difference"], interval["lower"], interval["upper"]
    ok = lo <= margin + 1e-9
    return Rule(name, ok, f"candidate - {against} {d:+.4g}, {interval['level']:.0%} [{lo:+.4g}, {hi:+.4g}] over "
                          f"{interval['items']} items: lower bound {lo:+.4g} {'<=' if ok else '>'} {margin:+g}")


def _interval_at_least(name: str, interval: dict | None, margin: float, bound: str, against: str) -> Rule:
    """The paired interval of candidate - `against` decides: its `bound` ("lower": a gain the data show;
    "upper": no drop the data show) >= margin. A report without the interval fails."""
    if not interval:
        return Rule(name, False, f"the report has no paired interval of candidate - {against} (evaluate again, or "
                                 "set registry.gate.use_intervals: false)")
    d, lo, hi, value = interval["difference"], interval["lower"], interval["upper"], interval[bound]
    margin += 0.0  # -0.0 (epsilon 0) reads "+0"
    ok = value >= margin - 1e-9
    return Rule(name, ok, f"candidate - {against} {d:+.4g}, {interval['level']:.0%} [{lo:+.4g}, {hi:+.4g}] over "
                          f"{interval['items']} items: {bound} bound {value:+.4g} {'>=' if ok else '<'} {margin:+g}")


def _logged_report(client, run_id: str) -> dict | None:
    """The evaluation metrics.json logged in a run (None when there is none)."""
    with tempfile.TemporaryDirectory(prefix="umo-report-") as tmp:
        try:
            path = client.download_artifacts(run_id, "evaluation/metrics.json", tmp)
        except (MlflowException, OSError):
            return None
        return json.loads(Path(path).read_text())


def _version_report(client, mv) -> dict:
    metrics = _logged_report(client, mv.run_id)
    if metrics is None:
        raise RegistryError(f"version {mv.version}: its run {mv.run_id} has no evaluation/metrics.json")
    sha = ((metrics.get("models") or {}).get("candidate") or {}).get("sha256")
    if sha != mv.tags.get(LORA_SHA_TAG):
        raise RegistryError(f"version {mv.version}: its run's evaluation report is of another LoRA ({sha})")
    return metrics


def _alias_version(client, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _promote(client, name: str, version: str, champion) -> None:
    """The only code that sets `champion`: the old champion keeps `previous`."""
    if champion is not None and champion.version == version:
        return
    if champion is not None:
        client.set_registered_model_alias(name, PREVIOUS, champion.version)
    client.set_registered_model_alias(name, CHAMPION, version)
    log.info("%s: champion is now version %s (previous: %s)", name, version,
             champion.version if champion else "none")


def approved_champion(client, name: str, version: str | None = None):
    """The version holding `champion` with a passed gate decision (and equal to `version` when given)."""
    champion = _alias_version(client, name, CHAMPION)
    if champion is None:
        raise RegistryError(f"{name}: no version holds `{CHAMPION}`; run `umo gate` first")
    if version is not None and str(version) != str(champion.version):
        raise RegistryError(f"{name} version {version} is not the champion (version {champion.version} is): only "
                            "the champion is deployed")
    if champion.tags.get(DECISION_TAG) != "passed":
        raise RegistryError(f"{name} version {champion.version} holds `{CHAMPION}` but has no passed gate decision "
                            f"({DECISION_TAG} = {champion.tags.get(DECISION_TAG)})")
    return champion


def champion_version(registry: RegistryConfig, tracking: TrackingConfig) -> str | None:
    """The version holding `champion`, None when no version does (the gate has passed none yet)."""
    champion = _alias_version(client_for(tracking), registry.model_name, CHAMPION)
    return None if champion is None else str(champion.version)


def champion_lora(registry: RegistryConfig, tracking: TrackingConfig, out: str | Path) -> Path | None:
    """The current champion's LoRA downloaded into `out` (for `umo evaluate --champion`); None without one."""
    client = client_for(tracking)
    champion = _alias_version(client, registry.model_name, CHAMPION)
    if champion is None:
        return None
    return version_files(client, registry.model_name, champion.version, out)["lora"]


def version_files(client, name: str, version: str, out: str | Path) -> dict[str, Path]:
    """A version's deployable files (LoRA, config, model card) downloaded into `out`."""
    mv = client.get_model_version(name, str(version))
    # where the version's files are, resolved by this client (a models:/ URI would use mlflow's global store)
    source = client.get_model_version_download_uri(name, mv.version)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(out),
                                                     tracking_uri=client.tracking_uri))
    found = {p.name: p for p in local.rglob("*") if p.is_file()}

    missing = [f for f in (LORA_FILE, CONFIG_FILE, CARD_FILE) if f not in found]
    if missing:
        raise RegistryError(f"{name} version {mv.version}: its model lacks {missing}")
    return {"lora": found[LORA_FILE], "config": found[CONFIG_FILE], "model_card": found[CARD_FILE]}
