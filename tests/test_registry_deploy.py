"""Registration, the approval gate and deployment against a real `mlflow server` (SQLite store) and moto's S3
server, both on 127.0.0.1 with free ports, started and stopped here by their own PIDs.

The story: a real (tiny) training run tracked in MLflow, evaluated (evalkit's judge), registered as version 1;
the gate refuses it under the default policy (the random-ish candidate scores below the base) and approves it
under a lenient one; version 2 (another LoRA) is refused while its report lacks the champion's column, then
approved from a report with it; deployments follow the champion, and roll back."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import pytest
import yaml
from browser import dump_dom, dump_dom_showing
from evalkit import eval_config, fixed_judges, random_lora
from PIL import Image
from freshenv import fresh_venv, path_without, pinned
from servers import MotoServer, free_port, moto_s3, stop, wait_http
from trainkit import fixed_reward, make_manifest, train_with

from umo.config import to_dict
from umo.deploy import DeployError, deploy, parse_target, rollback, verify_current
from umo.eval.run import evaluate
from umo.io import dvc_dir_md5
from umo.registry import CHAMPION, RegistryError, champion_lora, gate, logged_model_id, register
from umo.package import serve_settings

ROOT = Path(__file__).resolve().parents[1]
SECRET = "umo-test-secret-key-never-logged"
NAME = "umo-test"
LENIENT = ["registry.gate.min_id_sim_gain=-100", "registry.gate.max_id_conf_drop=100",
           "registry.gate.champion_margin=-100"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with moto_s3(tmp_path_factory.mktemp("moto"), key="umo-test-key", secret=SECRET, bucket="models") as server:
        yield server


@pytest.fixture(scope="module")
def world(toy_world, tiny_generator_dir, tmp_path_factory, mlflow_service):
    """A tracked training run, its report, and the settings every test uses; on the session's `mlflow server`
    (conftest), where this module's model is the only one named NAME."""

    root = tmp_path_factory.mktemp("registry")
    server = mlflow_service
    manifest = make_manifest(root / "data", toy_world)

    settings = [f"tracking.tracking_uri={server.uri}", f"registry.model_name={NAME}",
                f"deploy.target={root / 'deployed'}"]

    def config(*overrides):
        return eval_config(toy_world, tiny_generator_dir, manifest, *settings, *overrides)

    short = config("train.max_steps=2")
    trained = train_with(short, manifest=manifest, out=root / "train", reward_model=fixed_reward(toy_world),
                         tracking=short.tracking)
    # what `dvc repro` would have recorded for the stage that trained it (registration names that run)
    lock = {"cmd": "umo train --out train", "deps": [{"path": "data", "md5": "0" * 32 + ".dir"}],
            "outs": [{"path": "train/lora", "hash": "md5", "md5": dvc_dir_md5(root / "train" / "lora")}]}
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"train": lock}}))
    full = config()
    report = evaluate(full.eval, generator=full.generator, faces=full.faces, lora=trained.lora,
                      judges=fixed_judges(full), out=root / "report-v1")
    cli = [*toy_world.faces_overrides(), f"generator.path={tiny_generator_dir}", *settings]
    return {"root": root, "server": server, "config": config, "cli": sum((["-S", o] for o in cli), []),
            "train": root / "train", "report": report, "run_id": trained.run_id, "lora": trained.lora,
            "toy_world": toy_world}


def register_from(config, **kw):
    """register() with the sections of one params file."""
    return register(config.registry, config.tracking, serving=serve_settings(config), lora=config.lora, **kw)


def test_registration_carries_the_evidence_and_is_not_repeated(world, monkeypatch):
    import mlflow

    config = world["config"]()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # the held-out report stands in for the scaling set's (the same LoRA, the same layout)
    first = register_from(config, train_dir=world["train"], report=world["report"].out, scaling=world["report"].out)
    # mlflow.set_tracking_uri exports the URI to child processes: registering leaves the process as it was
    assert "MLFLOW_TRACKING_URI" not in os.environ and mlflow.get_tracking_uri() != world["server"].uri
    assert (first.version, first.run_id, first.created) == ("1", world["run_id"], True)
    client = mlflow.MlflowClient(world["server"].uri)
    mv = client.get_model_version_by_alias(NAME, "challenger")
    assert mv.version == "1" and mv.run_id == world["run_id"]
    assert {"git_commit", "dvc.data_md5", "dvc.params_md5", "base_model", "toy_world", "umo.lora_sha256"} <= set(mv.tags)
    data_md5 = yaml.safe_load((Path(__file__).resolve().parents[1] / "data.dvc").read_text())["outs"][0]["md5"]
    assert mv.tags["toy_world"] == "true" and mv.tags["dvc.data_md5"] == data_md5 and data_md5.endswith(".dir")
    metrics = world["report"].metrics
    assert mv.tags["eval.candidate.id_sim"] == str(metrics["candidate"]["id_sim"])
    # the evidence the gate requires: 4 items x 2 images, two fixed faces and two people in each
    assert {k: mv.tags[f"eval.candidate.{k}"] for k in ("images_scored", "faces_scored", "references_scored")} == \
        {"images_scored": "8", "faces_scored": "16", "references_scored": "16"}
    assert "| References scored | 16 | 16 |" in (world["report"].out / "report.md").read_text()
    assert "ID-Sim" in mv.description and "Toy world" in mv.description
    run = client.get_run(world["run_id"])
    assert run.data.metrics["eval.candidate.id_sim"] == pytest.approx(metrics["candidate"]["id_sim"])
    assert run.data.metrics["eval.delta.id_sim"] == pytest.approx(metrics["delta"]["id_sim"])
    for judge in ("toy_r10", "toy_mbf"):  # every judge's numbers
        assert run.data.metrics[f"eval.judge.{judge}.candidate.id_sim"] == pytest.approx(
            metrics["judges"][judge]["candidate"]["id_sim"])
    assert run.data.metrics["eval.scaling.candidate.by_identities.2.id_sim"] == pytest.approx(
        metrics["candidate"]["by_identities"]["2"]["id_sim"])
    assert {a.path for a in client.list_artifacts(world["run_id"], "evaluation/scaling")} >= {
        "evaluation/scaling/report.md", "evaluation/scaling/metrics.json"}
    logged = {a.path for a in client.list_artifacts(world["run_id"], "evaluation")}
    assert {"evaluation/report.md", "evaluation/metrics.json", "evaluation/grids", "evaluation/matching"} <= logged
    # the matching pictures of the items drawn in grids/, for every model of the report
    grids = {a.path.rsplit("-", 1)[-1] for a in client.list_artifacts(world["run_id"], "evaluation/grids")}
    for model in ("base", "candidate"):
        drawn = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(world["run_id"],
                                                                          f"evaluation/matching/{model}")}
        assert drawn and {d.rsplit("-", 1)[-1] for d in drawn} == grids

    # MLflow 3's evidence: the report's numbers are the LoggedModel's metrics, each on the data set it measured
    logged = client.get_logged_model(logged_model_id(mv))
    on_model = {m.key: m for m in logged.metrics}
    held_out = metrics["dataset"]
    assert on_model["eval.candidate.id_sim"].value == pytest.approx(metrics["candidate"]["id_sim"])
    assert (on_model["eval.candidate.id_sim"].dataset_name, on_model["eval.candidate.id_sim"].dataset_digest) == \
        ("heldout", held_out["digest"])
    # the training run's inputs: the training manifest (logged by training) and the evaluated set
    inputs = {(d.dataset.name, d.tags[0].value): d.dataset for d in run.inputs.dataset_inputs}
    assert inputs[("heldout", "evaluation")].digest == held_out["digest"] and ("train", "training") in inputs
    assert run.data.tags["mlflow.source.git.commit"] and run.data.tags["mlflow.source.name"] == "umo train"
    lock = yaml.safe_load((world["root"] / "dvc.lock").read_text())["stages"]["train"]
    stage_md5 = hashlib.md5(json.dumps(lock, sort_keys=True).encode()).hexdigest()
    assert mv.tags["dvc.stage.train.md5"] == run.data.tags["dvc.stage.train.md5"] == stage_md5
    # the model: from code, umo's sources beside it (not the toy world), pinned requirements, signature, example
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri(NAME, "1"), dst_path=str(world["root"] / "model-v1"),
        tracking_uri=world["server"].uri))
    requirements = (local / "requirements.txt").read_text().split()
    assert "torch==2.13.0" in requirements and not any(r.startswith(("umo", "prefect", "dvc")) for r in requirements)
    assert (local / "code" / "umo" / "serve.py").is_file() and not (local / "code" / "umo" / "toy").exists()
    assert not list(local.rglob("*.pkl")) and "python_model.pkl" not in (local / "MLmodel").read_text()
    example = json.loads((local / "serving_input_example.json").read_text())["dataframe_split"]
    assert example["columns"] == ["prompt", "references", "seed"] and len(example["data"][0][1]) == 2
    signature = yaml.safe_load((local / "MLmodel").read_text())["signature"]
    assert '"references", "type": "array"' in signature["inputs"].replace("'", '"') or "array" in signature["inputs"]

    again = register_from(config, train_dir=world["train"], report=world["report"].out)
    assert (again.version, again.created) == ("1", False)
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 1

    other = random_lora(config, world["root"] / "other-train" / "lora", 9)
    with pytest.raises(RegistryError, match="evaluated another LoRA"):
        register_from(config, train_dir=other.parent.parent, report=world["report"].out)
    foreign = world["root"] / "foreign-scaling"  # a scaling report of another LoRA is refused too
    shutil.copytree(world["report"].out, foreign)
    m = json.loads((foreign / "metrics.json").read_text())
    m["models"]["candidate"]["sha256"] = "0" * 64
    (foreign / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(RegistryError, match=r"foreign-scaling/metrics.json: the report evaluated another LoRA"):
        register_from(config, train_dir=world["train"], report=world["report"].out, scaling=foreign)


def test_the_registered_model_serves_from_a_fresh_environment(world, tmp_path):
    """`mlflow models serve` of the version, in a new virtual environment that holds exactly the model's
    requirements (freshenv: no umo, nothing of this repository), in a folder outside it; a REST call with the
    model's own input example (a prompt and base64 references) returns an image, and a reference without a face
    is a 400 that names it."""
    import mlflow

    register_from(world["config"](), train_dir=world["train"], report=world["report"].out)
    client = mlflow.MlflowClient(world["server"].uri)
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri(NAME, "1"), dst_path=str(tmp_path / "model"),
        tracking_uri=world["server"].uri))
    python = fresh_venv(tmp_path / "venv", pinned((local / "requirements.txt").read_text()))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | {
        "PATH": f"{python.parent}:{path_without(ROOT / '.venv', os.environ.get('PATH', ''))}",
        "MLFLOW_TRACKING_URI": world["server"].uri}
    outside = subprocess.run([str(python), "-c", "import umo"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert outside.returncode != 0 and "No module named 'umo'" in outside.stderr  # only the model brings umo

    port = free_port()
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([str(python), "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}/1",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            cwd=elsewhere, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, log, timeout=240)
        example = (local / "serving_input_example.json").read_text()
        answer = post_json(f"http://127.0.0.1:{port}/invocations", example)
        (row,) = answer["predictions"]
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(row["image"]))))
        assert image.shape == (64, 64, 3) and image.std() > 0
        faceless = io.BytesIO()
        Image.new("RGB", (48, 48), (128, 128, 128)).save(faceless, format="PNG")
        request = json.loads(example)
        request["dataframe_split"]["data"][0][1][1] = base64.b64encode(faceless.getvalue()).decode()
        with pytest.raises(urllib.error.HTTPError) as refused:
            post_json(f"http://127.0.0.1:{port}/invocations", json.dumps(request))
        message = json.loads(refused.value.read())["message"]
        assert refused.value.code == 400 and "reference 0.1: no face found" in message, message
    finally:
        stop(proc)
    assert "umo" not in {p.name for p in (tmp_path / "venv").rglob("site-packages/*")}


def post_json(url: str, body: str) -> dict:
    request = urllib.request.Request(url, data=body.encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.loads(r.read())


def test_gate_policy_champion_and_deployment_follow_each_other(world, s3, caplog):
    import mlflow

    config = world["config"]()
    register_from(config, train_dir=world["train"], report=world["report"].out)
    client = mlflow.MlflowClient(world["server"].uri)

    # the default policy: the candidate must not score below the base
    refused = gate(config.registry, config.tracking)
    failed = [r.name for r in refused.rules if not r.passed]
    assert not refused.passed and "id_sim" in failed  # a random LoRA scores below the base (ID-Conf may too)
    assert not {"faces_scored", "references_scored"} & set(failed)  # on sound evidence: 16 faces, 16 references
    mv = client.get_model_version(NAME, "1")
    assert mv.tags["gate.decision"] == "failed" and mv.tags["gate.rule.id_sim"].startswith("fail: candidate")
    assert all(mv.tags[f"gate.rule.{name}"].startswith("fail:") for name in failed)
    assert CHAMPION not in client.get_registered_model(NAME).aliases
    with pytest.raises(DeployError, match="no version holds `champion`"):
        deploy(config.deploy, config.registry, config.tracking)

    lenient = world["config"](*LENIENT)
    assert gate(lenient.registry, lenient.tracking).passed
    assert client.get_registered_model(NAME).aliases[CHAMPION] == "1"
    target = "s3://models/umo/prod"
    first = deploy(lenient.deploy, lenient.registry, lenient.tracking, target=target)
    assert (first.version, first.changed) == ("1", True)
    # the same version again: nothing to do
    assert not deploy(lenient.deploy, lenient.registry, lenient.tracking, target=target).changed

    # version 2: another LoRA, registered from an untracked run folder
    v2_train = world["root"] / "train-v2"
    lora2 = random_lora(config, v2_train / "lora", 5)
    alone = evaluate(config.eval, generator=config.generator, faces=config.faces, lora=lora2, judges=fixed_judges(config), out=world["root"] / "report-v2-alone")
    assert register_from(config, train_dir=v2_train, report=alone.out).version == "2"
    world["server"].stop()  # the registry restarts between registration and gate: nothing lost, nothing doubled
    world["server"].start()
    assert register_from(config, train_dir=v2_train, report=alone.out).created is False
    no_column = gate(lenient.registry, lenient.tracking)
    assert not no_column.passed and "no column for the current champion" in \
        next(r.detail for r in no_column.rules if r.name == "champion")
    champion = champion_lora(config.registry, config.tracking, world["root"] / "champion-download")
    assert champion is not None and champion.read_bytes() == world["lora"].read_bytes()
    with_champion = evaluate(config.eval, generator=config.generator, faces=config.faces, lora=lora2, champion=champion, judges=fixed_judges(config),
                             out=world["root"] / "report-v2")
    v2 = register_from(config, train_dir=v2_train, report=with_champion.out)  # new evidence, same version
    assert (v2.version, v2.created) == ("2", False)
    decision = gate(lenient.registry, lenient.tracking, version=v2.version)
    assert decision.passed and decision.previous_champion == "1"
    aliases = client.get_registered_model(NAME).aliases
    assert aliases[CHAMPION] == v2.version and aliases["previous"] == "1"
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 2

    with pytest.raises(DeployError, match="is not the champion"):
        deploy(lenient.deploy, lenient.registry, lenient.tracking, version="1", target=target)
    second = deploy(lenient.deploy, lenient.registry, lenient.tracking, target=target)
    assert second.pointer["history"] == ["1"] and second.version == v2.version
    back = rollback(lenient.deploy, lenient.registry.model_name, target=target)
    assert back.version == "1" and back.pointer["rolled_back_from"] == v2.version
    assert verify_current(lenient.deploy, lenient.registry.model_name, target=target).version == "1"
    pointer = json.loads(boto3.client("s3").get_object(Bucket="models", Key=f"umo/prod/{NAME}/current.json")
                         ["Body"].read())
    assert pointer["version"] == "1"
    assert SECRET not in caplog.text
    run = client.get_run(world["run_id"])
    assert SECRET not in json.dumps([run.data.params, run.data.tags])


def test_umo_generate_takes_a_path_an_alias_or_the_deployment_and_runs_the_served_code(world, s3, tmp_path,
                                                                                        monkeypatch, caplog):
    """After the gate test: champion = version 2, the S3 deployment points at version 1 (rolled back)."""
    import mlflow

    from umo.cli import main

    cli = world["cli"]
    refs = sorted((world["root"] / "data" / "refs").glob("*.png"))[:2]
    with_refs = [a for r in refs for a in ("--reference", str(r))]

    def generated(lora: str, name: str, *extra: str) -> np.ndarray:
        assert main(["generate", *cli, "--lora", lora, "--prompt", "two people", *with_refs, "--out",
                     str(tmp_path / name), "--seed", "3", *extra]) == 0
        return np.asarray(Image.open(tmp_path / name / "0.png"))

    champion = generated("champion", "alias")
    record = json.loads((tmp_path / "alias" / "generation.json").read_text())
    assert record["lora"]["source"] == f"{NAME} version 2 (champion)" and record["seeds"] == [3]
    # the served model, given the same prompt, references and seed, draws the same image
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["server"].uri)
    encoded = [base64.b64encode(r.read_bytes()).decode() for r in refs]
    served = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(pd.DataFrame({
        "prompt": ["two people"] * 2, "references": [encoded] * 2, "seed": [3, 3]}))
    assert [np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))), champion)
            for b in served["image"]] == [True, True]  # each row its own seed: the same image twice
    # a LoRA path: version 2's training folder, with the settings of the params file (the tests' settings)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(to_dict(world["config"]())))
    assert np.array_equal(generated(str(world["root"] / "train-v2" / "lora"), "path", "--params", str(params)),
                          champion)
    # the deployment: current.json of the S3 target points at version 1, verified, read, checked
    deployed = generated("s3://models/umo/prod", "deployed")
    assert np.array_equal(deployed, generated(f"models:/{NAME}/1", "version-1"))
    assert not np.array_equal(deployed, champion)

    # bad input: a clear error (exit 2) that names the reference, and no output folder
    faceless = tmp_path / "wall.png"
    Image.new("RGB", (48, 48), (128, 128, 128)).save(faceless)
    limit = world["config"]().prepare.max_identities
    for references, message in [([refs[0], tmp_path / "missing.png"], "missing.png: no such file"),
                                ([refs[0], faceless], "wall.png: no face found"),
                                ([refs[0]] * (limit + 1), f"{limit + 1} references, but this model supports at "
                                                          f"most {limit}")]:
        caplog.clear()
        args = [a for r in references for a in ("--reference", str(r))]
        assert main(["generate", *cli, "--lora", "champion", "--prompt", "x", *args, "--out",
                     str(tmp_path / "bad")]) == 2
        assert message in caplog.text and not (tmp_path / "bad").exists()
    assert main(["generate", *cli, "--lora", str(tmp_path / "nowhere"), "--prompt", "x", *with_refs, "--out",
                 str(tmp_path / "bad")]) == 2
    assert "no such file or folder, and not a registry alias" in caplog.text


class FailAfterParts:
    """A botocore hook that fails the upload of part number > n (a network cut in the middle of a multipart)."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, 0

    def __call__(self, params, **kwargs):
        if "PartNumber" in params:
            self.seen += 1
            if params["PartNumber"] > self.n:
                raise ConnectionError(f"cut after part {self.n}")


def test_an_interrupted_multipart_upload_leaves_the_pointer_and_a_rerun_completes(s3, tmp_path):
    from safetensors.numpy import save_file

    from umo.config import load_config
    from umo.deploy import POINTER, publish, verify

    weights = tmp_path / "pytorch_lora_weights.safetensors"  # 12.8 MB: three 5 MiB parts
    save_file({"w": np.random.default_rng(0).standard_normal(3_200_000).astype(np.float32)}, str(weights))
    card = tmp_path / "MODEL_CARD.md"
    card.write_text("# a model\n")
    config = load_config(None, ["deploy.multipart_threshold_mb=5", "deploy.multipart_chunk_mb=5"])
    client = boto3.client("s3")
    store = parse_target("s3://models/faults", config.deploy, s3_client=client)
    first = publish(store, "m", "1", [card], {}, None)
    before = store.read(f"m/{POINTER}")
    hook = FailAfterParts(1)
    client.meta.events.register("provide-client-params.s3.UploadPart", hook)
    with pytest.raises(Exception, match="cut after part 1"):
        publish(store, "m", "2", [weights, card], {}, first.pointer)
    assert hook.seen == 2 and store.read(f"m/{POINTER}") == before  # cut in the middle; readers still see 1
    # the cut upload's parts are aborted, not left to cost storage
    assert client.list_multipart_uploads(Bucket="models", Prefix="faults/").get("Uploads", []) == []
    client.meta.events.unregister("provide-client-params.s3.UploadPart", hook)
    done = publish(store, "m", "2", [weights, card], {}, json.loads(store.read(f"m/{POINTER}")))
    assert done.pointer["history"] == ["1"] and verify(store, "m", "2") == []
    assert json.loads(store.read(f"m/{POINTER}"))["version"] == "2"


def test_an_object_altered_after_upload_fails_verification_loudly(world, s3):
    config = world["config"](*LENIENT)
    _ensure_champion(world, config)
    target = "s3://models/tamper"
    result = deploy(config.deploy, config.registry, config.tracking, target=target)
    key = f"tamper/{NAME}/{result.version}/pytorch_lora_weights.safetensors"
    client = boto3.client("s3")
    data = bytearray(client.get_object(Bucket="models", Key=key)["Body"].read())
    data[-1] ^= 0xFF
    client.put_object(Bucket="models", Key=key, Body=bytes(data))
    with pytest.raises(DeployError, match="pytorch_lora_weights.safetensors: size .* sha256"):
        verify_current(config.deploy, config.registry.model_name, target=target)
    # the same version again: it does not verify, so it is re-uploaded
    repaired = deploy(config.deploy, config.registry, config.tracking, target=target)
    assert repaired.changed
    assert verify_current(config.deploy, config.registry.model_name, target=target).version == result.version


def test_a_local_folder_target_has_the_s3_layout(world, tmp_path):
    config = world["config"](*LENIENT)
    _ensure_champion(world, config)
    result = deploy(config.deploy, config.registry, config.tracking, target=str(tmp_path / "serve"))
    folder = tmp_path / "serve" / NAME / result.version
    assert sorted(p.name for p in folder.iterdir()) == ["MODEL_CARD.md", "config.json", "manifest.json",
                                                       "pytorch_lora_weights.safetensors"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["files"]["pytorch_lora_weights.safetensors"]["size"] == \
        (folder / "pytorch_lora_weights.safetensors").stat().st_size
    assert json.loads((tmp_path / "serve" / NAME / "current.json").read_text())["version"] == result.version
    assert "# umo-test" in (folder / "MODEL_CARD.md").read_text()


@pytest.mark.parametrize("target, message", [
    ("s3://Bad_Bucket/x", "not a valid S3 bucket"), ("s3://ab/x", "not a valid S3 bucket"),
    ("s3://models/../etc", "prefix"), ("s3://models/a//b", "prefix"), ("gs://models/x", "unsupported target")])
def test_bucket_and_prefix_are_validated(target, message):
    with pytest.raises(DeployError, match=message):
        parse_target(target)


def test_only_the_gate_sets_the_champion_alias():
    root = Path(__file__).resolve().parents[1] / "umo"
    setters = [(p.name, line.strip()) for p in root.rglob("*.py") for line in p.read_text().splitlines()
               if "set_registered_model_alias" in line]
    assert setters == [("registry.py", "client.set_registered_model_alias(name, CHALLENGER, version.version)"),
                       ("registry.py", "client.set_registered_model_alias(name, PREVIOUS, champion.version)"),
                       ("registry.py", "client.set_registered_model_alias(name, CHAMPION, version)")]


def _ensure_champion(world, config) -> None:
    import mlflow

    register_from(config, train_dir=world["train"], report=world["report"].out)
    client = mlflow.MlflowClient(world["server"].uri)
    if CHAMPION not in client.get_registered_model(NAME).aliases:
        assert gate(config.registry, config.tracking).passed


@pytest.mark.slow
def test_the_registry_ui_shows_the_version_its_aliases_and_metrics(world, tmp_path):
    """The MLflow UI, rendered by a real headless Chromium: the model version page a reviewer opens, and its
    run's picture of the matching."""
    config = world["config"](*LENIENT)
    _ensure_champion(world, config)
    import mlflow

    client = mlflow.MlflowClient(world["server"].uri)
    mv = client.get_model_version_by_alias(NAME, CHAMPION)
    url = f"{world['server'].uri}/#/models/{NAME}/versions/{mv.version}"
    shot = tmp_path / "model_version.png"
    dom = dump_dom(url, tmp_path / "profile", screenshot=shot)
    (tmp_path / "model_version.html").write_text(dom)
    assert shot.stat().st_size > 10_000
    assert f"Version {mv.version}" in dom, dom[-3000:]
    assert "@&nbsp;champion" in dom and "@&nbsp;challenger" in dom  # the alias tags the page draws
    assert "ID-Sim" in dom and str(world["report"].metrics["candidate"]["id_sim"])[:4] in dom

    # the run's page shows a picture of the matching (evaluation/matching/<model>/<item>.png), opened at it
    run = client.get_run(mv.run_id)
    pictures = [a.path for a in client.list_artifacts(mv.run_id, "evaluation/matching/candidate")]
    assert pictures, "registration logged no picture of the matching"
    url = f"{world['server'].uri}/#/experiments/{run.info.experiment_id}/runs/{mv.run_id}/artifacts/{pictures[0]}"
    dump_dom_showing(url, tmp_path / "profile", [f'<img alt="{pictures[0]}"'])

    # MLflow 3's pages: the LoggedModel's lists the evaluation metrics with the data set each is on; the page of
    # version 1's run (a tracked training) shows its datasets (the training manifest, the evaluated set with its
    # digest), where it came from (umo train at the git commit) and, among its metrics, the machine's load
    experiment, digest = run.info.experiment_id, world["report"].metrics["dataset"]["digest"]
    base = f"{world['server'].uri}/#/experiments/{experiment}"
    dump_dom_showing(f"{base}/models/{logged_model_id(mv)}", tmp_path / "profile",
                     ["eval.candidate.id_sim", f"heldout (#{digest}"], height=2000)
    trained = client.get_run(world["run_id"])
    commit = trained.data.tags["mlflow.source.git.commit"]
    dump_dom_showing(f"{base}/runs/{world['run_id']}", tmp_path / "profile",  # 2 datasets: the 2nd behind "+1"
                     [f"train ({trained.inputs.dataset_inputs[0].dataset.digest}) training +1", "umo train",
                      commit[:7], "Parameters (5", "dvc.stage.train.md5 : "
                      + trained.data.tags["dvc.stage.train.md5"]], height=2000)  # 56 settings, not the 165 of all sections
    dump_dom_showing(f"{base}/runs/{world['run_id']}/system-metrics", tmp_path / "profile",
                     ["cpu_utilization_percentage", "system_memory_usage_megabytes"], height=2000)


def test_the_cli_commands_exit_with_what_happened(world, tmp_path, capsys, caplog):
    from umo.cli import main

    cli = world["cli"]
    register_from(world["config"](), train_dir=world["train"], report=world["report"].out)
    assert main(["register", *cli, "--train", str(world["train"]), "--report", str(world["report"].out)]) == 0
    assert json.loads(capsys.readouterr().out)["created"] is False
    other = tmp_path / "other"
    random_lora(world["config"](), other / "lora", 11)
    assert main(["register", *cli, "--train", str(other), "--report", str(world["report"].out)]) == 2
    assert "evaluated another LoRA" in caplog.text
    assert main(["gate", *cli, "--version", "1"]) == 1  # the default policy refuses version 1 (below the base)
    assert json.loads(capsys.readouterr().out)["passed"] is False
    assert main(["deploy", *cli, "--verify", "--target", str(tmp_path / "empty")]) == 1
    assert "nothing deployed" in caplog.text
    assert main(["deploy", *cli, "--rollback", "--target", str(tmp_path / "empty")]) == 1
    assert "nothing to roll back" in caplog.text


def test_paths_from_a_pointer_are_confined_after_resolving(tmp_path):
    """A history entry edited to `../../evil` in current.json made rollback point outside the
    deployment root (a valid-looking version was waiting there), and --verify passed."""
    import hashlib

    from umo.config import load_config

    root = tmp_path / "serve"
    config = load_config(None, ["registry.model_name=m", f"deploy.target={root}"])
    evil = tmp_path / "evil"  # = serve/m/../../evil
    evil.mkdir()
    (evil / "a.bin").write_bytes(b"x")
    (evil / "manifest.json").write_text(json.dumps({"files": {"a.bin": {"size": 1,
                                                                          "sha256": hashlib.sha256(b"x").hexdigest()}}}))
    (root / "m").mkdir(parents=True)
    pointer = {"model": "m", "version": "2", "path": "m/2", "manifest": "m/2/manifest.json", "history": ["../../evil"]}
    (root / "m" / "current.json").write_text(json.dumps(pointer))
    with pytest.raises(DeployError, match=r"m/current.json: history\[0\] '../../evil' is not a version"):
        rollback(config.deploy, config.registry.model_name)
    assert json.loads((root / "m" / "current.json").read_text()) == pointer  # unchanged
    (root / "m" / "current.json").write_text(json.dumps(pointer | {"version": "../../evil", "history": []}))
    with pytest.raises(DeployError, match=r"current.json: version '../../evil' is not a version"):
        verify_current(config.deploy, config.registry.model_name)
    # a symlink inside the root that leads out of it is refused too
    (root / "m" / "3").symlink_to(evil, target_is_directory=True)
    (root / "m" / "current.json").write_text(json.dumps(pointer | {"version": "3", "manifest": "m/3/manifest.json",
                                                                   "history": []}))
    with pytest.raises(DeployError, match="outside the deployment root"):
        verify_current(config.deploy, config.registry.model_name)


def test_s3_faults_are_one_clear_line_and_stale_uploads_can_be_cleaned(s3, tmp_path, capsys):
    """A missing bucket or an unreachable endpoint printed a botocore traceback, and a deploy killed
    mid-upload left its multipart parts in the bucket forever."""
    from botocore.config import Config as BotoConfig

    from umo.cli import main
    from umo.config import load_config
    from umo.deploy import clean_incomplete

    card = tmp_path / "MODEL_CARD.md"
    card.write_text("# a model\n")
    missing = parse_target("s3://no-such-bucket/p", s3_client=boto3.client("s3"))
    with pytest.raises(DeployError) as err:
        missing.put_file("m/1/MODEL_CARD.md", card, "x")
    assert str(err.value) == ("S3 upload of s3://no-such-bucket/p/m/1/MODEL_CARD.md failed: NoSuchBucket (The "
                              "specified bucket does not exist); check the bucket of deploy.target (it must exist; "
                              "umo does not create buckets)")
    from servers import free_port

    closed = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{free_port()}",
                          config=BotoConfig(retries={"max_attempts": 1}, connect_timeout=1))
    with pytest.raises(DeployError, match=r"^S3 read of s3://models/p/m/current.json failed: cannot reach the "
                                          r"endpoint .*; check AWS_ENDPOINT_URL_S3"):
        parse_target("s3://models/p", s3_client=closed).read("m/current.json")

    # a killed deploy (no chance to abort): its unfinished upload stays until --clean-incomplete
    client = boto3.client("s3")
    started = client.create_multipart_upload(Bucket="models", Key="stale/m/3/pytorch_lora_weights.safetensors")
    client.upload_part(Bucket="models", Key="stale/m/3/pytorch_lora_weights.safetensors", PartNumber=1,
                       UploadId=started["UploadId"], Body=b"x" * 1024)
    other = client.create_multipart_upload(Bucket="models", Key="stale/other-model/1/w.safetensors")
    config = load_config(None, ["registry.model_name=m", "deploy.target=s3://models/stale"])
    assert main(["deploy", "-S", "registry.model_name=m", "--target", "s3://models/stale", "--clean-incomplete"]) == 0
    assert "m: 1 unfinished upload(s) removed" in capsys.readouterr().out
    left = client.list_multipart_uploads(Bucket="models", Prefix="stale/").get("Uploads", [])
    assert [u["UploadId"] for u in left] == [other["UploadId"]]  # another model's prefix is not touched
    assert clean_incomplete(config.deploy, config.registry.model_name) == 0


def test_wrong_credentials_are_one_clear_line(tmp_path):
    """Wrong credentials printed a full botocore traceback. A moto server that checks credentials
    refuses an unknown key as AWS does."""
    server = MotoServer(tmp_path / "moto").start(check_credentials=True)
    try:
        client = boto3.client("s3", endpoint_url=server.uri, region_name="us-east-1",
                              aws_access_key_id="AKIAWRONGWRONGWRONG0", aws_secret_access_key="wrong")
        with pytest.raises(DeployError) as err:
            parse_target("s3://models/p", s3_client=client).put_bytes("m/current.json", b"{}")
        assert str(err.value).startswith("S3 write of s3://models/p/m/current.json failed: InvalidAccessKeyId (")
        assert str(err.value).endswith("check the credentials (AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) "
                                       "and the bucket's policy")
        assert "\n" not in str(err.value) and "wrong" not in str(err.value).replace("Wrong", "")
    finally:
        server.stop()
