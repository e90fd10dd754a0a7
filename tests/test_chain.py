"""The whole chain in a temporary copy of this repository, driven both ways: `dvc repro` (then a no-op, then
`dvc exp run -S`) and the Prefect flow under the test harness (a real Prefect server and worker run the flow in
tests/test_flows.py). The copy uses the tests' small toy world and a few training steps (the embedded default's own
numbers are the README's `make run`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from toyworlds import SMALL_WORLD

from umo.config import write_overrides

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from flows.umo_pipeline import umo_pipeline  # noqa: E402

pytestmark = pytest.mark.slow
STAGES = ("toyworld", "toybase", "prepare", "train", "evaluate", "scaling", "evaluate_scaling", "register", "gate",
          "deploy")  # dvc.yaml's chain

FAST = {  # a chain of seconds per stage: a toy base of a few steps, a few training steps, two items, one image each
    "toyworld.collection.cast": [200, 216],  # held-out ids of the small world
    "toyworld.reward.identities": None, "toyworld.judge.identities": None,  # the small world's embedders: all ids
    "toybase.photos.n_train": 24, "toybase.photos.n_test": 2,
    "toybase.vae.channels": [8, 8, 8, 8], "toybase.vae.latent_channels": 4, "toybase.vae.steps": 2,
    "toybase.vae.batch": 4, "toybase.vae.crop": 32,
    "toybase.model.heads": 2, "toybase.model.head_dim": 16, "toybase.model.double_blocks": 1,
    "toybase.model.single_blocks": 1, "toybase.model.steps": 2, "toybase.model.batch": 4, "toybase.model.warmup": 1,
    "toybase.model.compile": False,
    # an untrained base draws no faces: its gate is opened here to test the chain's mechanics (the registry's
    # gate then refuses every version for want of evidence; approve_by_hand stands in for a person)
    "toybase.gate.min_two_face_rate": 0.0, "toybase.gate.min_id_sim": 0.0, "toybase.gate.id_conf": None,
    "toybase.gate.images_per_item": 1, "toybase.gate.steps": 2,
    "train.max_steps": 2, "train.checkpoint_every": 2, "train.sample_every": 0, "train.warmup_steps": 0,
    "train.sampler_steps": 4, "train.grad_step_range": [1, 2],
    "prepare.synthetic.count": 2, "prepare.synthetic.steps": 4,
    "eval.max_items": 2, "eval.images_per_item": 1, "eval.steps": 4, "eval.report_items": 1,
    "toybase.scaling.identities": [2, 3], "toybase.scaling.items_per_count": 1, "eval.scaling.images_per_item": 1,
    "registry.gate.min_scored_references": 2,  # those two one-image items hold a few references, not params' 16
    # the small world's reward embedder is a toy_r10 (params.yaml's world: toy_r18)
    "faces.embedder.path": "artifacts/toyworld/models/faces/arcface_toy_r10.safetensors",
    "faces.embedder.arch": "toy_r10",
}


def dotted(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= dotted(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


OTHER_STORES = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@pytest.fixture(autouse=True)
def embedded_stores(monkeypatch):
    """The flows run in this process and start their stages with its environment: no other module's store."""
    for name in OTHER_STORES:
        monkeypatch.delenv(name, raising=False)


def env() -> dict[str, str]:
    """The chain's environment: this venv's tools first, the embedded default's stores (no servers, no S3)."""
    clean = {k: v for k, v in os.environ.items() if k not in OTHER_STORES}
    return clean | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def run(cmd: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=kw.pop("env", env()), capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def git(cwd: Path, *args: str) -> None:
    run(["git", "-c", "user.name=umo-test", "-c", "user.email=test@umo.invalid", *args], cwd)


@pytest.fixture(scope="module")
def project(tmp_path_factory, toy_world):
    """A copy of this checkout (tracked and new files, as git sees them) with the small world's settings, its
    raw collection re-added to data.dvc, and the small world's models copied in (the build reuses them)."""
    root = tmp_path_factory.mktemp("chain") / "umo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, root / name)
    items = dotted({"toyworld": SMALL_WORLD}) | FAST
    write_overrides(root / "params.yaml", [f"{k}={json.dumps(v)}" for k, v in items.items()])
    shutil.copytree(toy_world.root, root / "artifacts" / "toyworld")
    run(["git", "init", "-q"], root)
    run([sys.executable, "-m", "umo.cli", "toyworld", "raw", "--out", "data", "--truth", "artifacts/raw_truth.jsonl"],
        root)
    run([sys.executable, "-m", "dvc", "add", "-q", "data"], root)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "the small world")
    return root


# pytest-timeout counts fixture setup too: this test's setup waits for the small world's background build (3 to 7
# minutes on a fresh clone of 2 cores), then the chain runs (2 to 3 minutes)
@pytest.mark.timeout(1200)
def test_dvc_repro_runs_the_chain_then_is_a_noop(project):
    out = run([sys.executable, "-m", "dvc", "repro"], project).stdout
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out or stage == "toyworld", out[-2000:]
    assert "accelerate launch --config_file infra/accelerate/cpu.yaml -m umo.cli train" in out
    report = json.loads((project / "artifacts/reports/heldout/metrics.json").read_text())
    assert report["toy_world"] and set(report["models"]) >= {"base", "candidate"}
    scaling = json.loads((project / "artifacts/reports/scaling/metrics.json").read_text())
    assert scaling["benchmark"] == "xverse" and set(scaling["candidate"]["by_identities"]) == {"2", "3"}
    assert (project / "artifacts/reports/scaling/by_identities.png").is_file()
    registered = json.loads((project / "artifacts/registry/registered.json").read_text())
    gate = json.loads((project / "artifacts/registry/gate.json").read_text())
    deployed = json.loads((project / "artifacts/registry/deployed.json").read_text())
    # the untrained base and its LoRA draw no faces: the gate refuses for want of evidence, nothing is deployed
    assert registered["version"] == gate["version"] == "1" and not gate["passed"]
    assert gate["rules"]["faces_scored"].startswith("FAIL") and "no faces scored" in gate["rules"]["faces_scored"]
    assert deployed["version"] is None and "nothing deployed" in deployed["reason"]
    assert not (project / "artifacts/deploy/umo-flux2-klein-lora/current.json").exists()
    lock = (project / "dvc.lock").read_text()
    assert all(f"\n  {stage}:" in lock for stage in STAGES)
    # the version names the DVC run of the train stage that made its LoRA, and its run the data it trained on
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/artifacts/mlflow/mlflow.db")
    mv = client.get_model_version("umo-flux2-klein-lora", "1")
    entry = yaml.safe_load(lock)["stages"]["train"]
    assert mv.tags["dvc.stage.train.md5"] == hashlib.md5(json.dumps(entry, sort_keys=True).encode()).hexdigest()
    run_tags = client.get_run(mv.run_id).data.tags
    assert run_tags["dvc.stage"] == "train" and run_tags["mlflow.source.name"] == "umo train"
    assert {d.dataset.name for d in client.get_run(mv.run_id).inputs.dataset_inputs} == {"train", "heldout", "xverse"}

    again = run([sys.executable, "-m", "dvc", "repro"], project).stdout
    assert "Running stage" not in again
    assert all(f"Stage '{stage}' didn't change, skipping" in again for stage in STAGES), again

    approve_by_hand(project, "1")
    run([sys.executable, "-m", "umo.cli", "deploy", "--none-ok", "--record", "artifacts/registry/deployed.json"],
        project)
    pointer = json.loads((project / "artifacts/deploy/umo-flux2-klein-lora/current.json").read_text())
    assert pointer["version"] == "1"


def approve_by_hand(project: Path, version: str) -> None:
    """What a person approving `version` does (the registry gate refused it: the test chain's base draws no
    faces): `champion` moves to it, with a passed decision."""
    from mlflow import MlflowClient

    from umo.registry import CHAMPION, DECISION_TAG

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/artifacts/mlflow/mlflow.db")
    client.set_registered_model_alias("umo-flux2-klein-lora", CHAMPION, version)
    client.set_model_version_tag("umo-flux2-klein-lora", version, DECISION_TAG, "passed")


def test_dvc_exp_run_with_another_deployment_setting(project):
    """An experiment (`dvc exp run -S`) runs only what its setting reaches, and `dvc exp show` lists it. (A
    retraining override: the flow's test below. A stricter gate here would re-decide version 1, which the first
    test approved by hand, and leave `champion` on a failed decision: deploy refuses that, rightly.) It runs in the
    workspace, as `dvc exp run` does without --temp: --temp's workspace is made from git alone and lacks the
    outputs that DVC does not cache (stats.json, the records), so it reruns data prep and the gate, which is why
    the flow makes its experiments' workspaces itself (umo.experiments)."""
    git(project, "add", "-A")
    git(project, "commit", "-qm", "the chain's first run")
    record = project / "artifacts/registry/deployed.json"
    kept = record.read_bytes()
    out = run([sys.executable, "-m", "dvc", "exp", "run", "-S", "deploy.multipart_chunk_mb=8.5"], project).stdout
    for stage in ("toyworld", "toybase", "prepare", "train", "evaluate", "scaling", "evaluate_scaling", "register",
                  "gate"):
        assert f"Stage '{stage}' didn't change, skipping" in out, stage
    assert "Running stage 'deploy'" in out
    deployed = json.loads(record.read_text())
    assert deployed["version"] == "1"  # the hand-approved champion, already in place
    shown = run([sys.executable, "-m", "dvc", "exp", "show", "--json"], project).stdout
    assert "8.5" in shown
    # back to the committed workspace, as the flow's test expects it: settings, lock and the deploy record
    git(project, "checkout", "--", "params.yaml", "dvc.lock")
    record.write_bytes(kept)
    # dvc.yaml: the main chain (a bare `dvc checkout` also takes ablation/dvc.yaml, whose outputs never ran here)
    run([sys.executable, "-m", "dvc", "checkout", "-q", "dvc.yaml"], project)


def test_flow_override_is_a_dvc_experiment_that_reruns_only_what_it_changes(project, prefect_harness):
    from mlflow import MlflowClient
    from prefect.artifacts import Artifact

    before = (project / "params.yaml").read_bytes()
    # what the checkout's own pipeline would run now (the first test deployed by hand, outside DVC: deploy)
    pending = set(json.loads(run([sys.executable, "-m", "dvc", "status", "--json", "dvc.yaml"], project).stdout))
    done = umo_pipeline(overrides={"train.learning_rate": 0.0002}, project_dir=str(project),
                        retry_delay_seconds=0)
    assert done == {s: "skipped" for s in ("toyworld", "toybase", "prepare", "scaling")} | {
        s: "ran" for s in ("train", "evaluate", "evaluate_scaling", "register", "gate", "deploy")}
    assert (project / "params.yaml").read_bytes() == before  # the checkout's settings, byte for byte
    shown = json.loads(run([sys.executable, "-m", "dvc", "exp", "show", "--json"], project).stdout)
    exps = [e["revs"][0] for row in shown for e in (row.get("experiments") or [])]
    (exp,) = [e for e in exps if e["name"].startswith("umo-")]
    assert exp["data"]["params"]["params.yaml"]["data"]["train"]["learning_rate"] == 0.0002
    # registered into the checkout's registry (the experiment's $DVC_ROOT), with the experiment's settings
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/artifacts/mlflow/mlflow.db")
    newest = max(client.search_model_versions("name='umo-flux2-klein-lora'"), key=lambda v: int(v.version))
    assert int(newest.version) >= 2
    assert client.get_run(newest.run_id).data.params["train.learning_rate"] == "0.0002"

    evaluation, decision = Artifact.get("umo-evaluation"), Artifact.get("umo-gate")
    assert "ID-Sim" in evaluation.data and "toy world" in evaluation.data.lower()
    assert "by number of people" in Artifact.get("umo-scaling").data.lower()
    matching = Artifact.get("umo-matching")  # the judge's matching of the items drawn in grids/, inline
    assert matching.data.count("](data:image/jpeg;base64,") >= 2  # base and candidate
    rules = {row["rule"]: row for row in json.loads(decision.data)}  # the gate's table: a row per rule
    assert f"version {newest.version}: FAILED" in decision.description
    assert rules["faces_scored"]["result"] == "FAIL" and "no faces scored" in rules["faces_scored"]["numbers"]
    assert Artifact.get("umo-deployment") is not None  # the link to what current.json points at
    # the experiment changed nothing for the checkout: DVC finds the same stages pending as before it ran
    assert pending <= {"deploy"}
    assert set(json.loads(run([sys.executable, "-m", "dvc", "status", "--json", "dvc.yaml"], project).stdout)) == pending


def test_weekly_reevaluation_of_the_champion(project, prefect_harness):
    from prefect.artifacts import Artifact

    from flows.umo_pipeline import reevaluate_champion

    report = Path(reevaluate_champion(project_dir=str(project), retry_delay_seconds=0))
    assert report == project / "artifacts/reports/champion-heldout"
    metrics = json.loads((report / "metrics.json").read_text())
    deployed = json.loads((project / "artifacts/registry/deployed.json").read_text())
    pointer = json.loads((project / f"artifacts/deploy/{deployed['model']}/current.json").read_text())
    manifest = json.loads((project / "artifacts/deploy" / pointer["manifest"]).read_text())
    champion = manifest["files"]["pytorch_lora_weights.safetensors"]["sha256"]
    assert metrics["models"]["candidate"]["sha256"] == champion  # the champion, as deployed
    assert "ID-Sim" in Artifact.get("umo-champion-evaluation").data
