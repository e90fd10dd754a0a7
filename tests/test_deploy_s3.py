"""Safe and verified writes of `umo deploy`, against moto's real S3 server on 127.0.0.1 (one for the module,
stopped by its PID) and a local folder: S3 checksums on write and read-back, conditional writes of current.json
and of a version's manifest (two real processes racing), immutable versions, standard retries, faults (wrong
credentials, a missing bucket, no champion, a tampered object, an upload killed by SIGKILL) that leave
current.json and the previous version byte-for-byte as they were, and no secret in any output.

The files are small and made here (a 12 MiB safetensors where a multipart upload is the point); the registry
part uses the session's `mlflow server` with versions made here (the gate's own tests are in
test_registry_deploy.py)."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import numpy as np
import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from safetensors.numpy import save_file
from servers import moto_s3

from umo.config import DeployConfig, load_config
from umo.deploy import (MANIFEST, POINTER, READ_BACK, S3_CHECKSUM, Conflict, DeployError, clean_incomplete,
                        composite_sha256, deploy, parse_target, publish, read_pointer, rollback, verify,
                        verify_current)

# Joined at run time, so that no file holds a marker but what leaked it (the chain's tests copy this repository,
# this file included, into the same temporary folders that the scan below reads)
SECRET = "-".join(("umo-s3-secret", "marker-never-written"))
WRONG_SECRET = "-".join(("umo-s3-wrong-secret", "marker-never-written"))
BUCKET = "models"
SMALL = DeployConfig(multipart_threshold_mb=5, multipart_chunk_mb=5)  # a 12 MiB file goes in 3 parts
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with moto_s3(tmp_path_factory.mktemp("moto"), key="umo-s3-test-key", secret=SECRET, bucket=BUCKET) as server:
        yield server


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """A 12.4 MB safetensors LoRA stand-in: three parts of 5 MiB (the last shorter)."""
    path = tmp_path_factory.mktemp("big") / "pytorch_lora_weights.safetensors"
    save_file({"w": np.random.default_rng(0).standard_normal(3_100_000).astype(np.float32)}, str(path))
    return path


def model_files(folder: Path, seed: int, weights: Path | None = None) -> list[Path]:
    """A version's deployable files: weights (tiny unless given), config.json, MODEL_CARD.md."""
    folder.mkdir(parents=True, exist_ok=True)
    lora = folder / "pytorch_lora_weights.safetensors"
    if weights is None:
        save_file({"lora_A": np.random.default_rng(seed).standard_normal((4, 8)).astype(np.float32)}, str(lora))
    else:
        lora.write_bytes(weights.read_bytes())
    (folder / "config.json").write_text(json.dumps({"rank": 4, "seed": seed}))
    (folder / "MODEL_CARD.md").write_text(f"# model, seed {seed}\n")
    return [lora, folder / "config.json", folder / "MODEL_CARD.md"]


def contents(target: str) -> dict[str, bytes]:
    """Every object (S3) or file (folder) under a target, by key relative to it."""
    if target.startswith("s3://"):
        bucket, _, prefix = target[len("s3://"):].partition("/")
        client = boto3.client("s3")
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        return {k[len(prefix) + 1:]: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}
    files = [p for p in Path(target).rglob("*") if p.is_file()]
    return {p.relative_to(target).as_posix(): p.read_bytes() for p in files}


def under(snapshot: dict[str, bytes], folder: str) -> dict[str, bytes]:
    """The objects of a snapshot under `folder` (e.g. a version's, "m/1/")."""
    return {k: v for k, v in snapshot.items() if k.startswith(folder)}


def but_pointer(snapshot: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in snapshot.items() if not k.endswith(f"/{POINTER}")}


def counting(client, event: str = "before-send.s3") -> list[str]:
    """The URL (no query) of every request the client sends from now on (`event`: all, or one operation's)."""
    sent: list[str] = []
    client.meta.events.register(event, lambda request, **kw: sent.append(request.url.split("?")[0]))
    return sent


@pytest.fixture(params=["s3", "folder"])
def target(request, s3, tmp_path) -> str:
    """A fresh deployment target: a prefix of the bucket, or a folder."""
    if request.param == "s3":
        return f"s3://{BUCKET}/{tmp_path.name}"
    return str(tmp_path / "serve")


# ------------------------------------------------------------------------------------------------ the store


def test_what_moto_honours(s3, big):
    """The server the tests rely on: SHA-256 checksums kept and returned (a multipart object's as the composite
    of its parts, `-N` only on GET), conditional PUTs refused with 412, If-Match on a missing key 404. moto does
    NOT check a checksum the client sends against the bytes (AWS does)."""
    client = boto3.client("s3")
    data = b"hello"
    b64 = base64.b64encode(hashlib.sha256(data).digest()).decode()
    client.put_object(Bucket=BUCKET, Key="probe/a", Body=data, ChecksumAlgorithm="SHA256")
    assert client.head_object(Bucket=BUCKET, Key="probe/a", ChecksumMode="ENABLED")["ChecksumSHA256"] == b64
    client.upload_file(str(big), BUCKET, "probe/big", ExtraArgs={"ChecksumAlgorithm": "SHA256"},
                       Config=parse_target(f"s3://{BUCKET}/probe", SMALL).transfer)
    want, parts = composite_sha256(big, 5 * 2**20)
    head = client.head_object(Bucket=BUCKET, Key="probe/big", ChecksumMode="ENABLED")
    got = client.get_object(Bucket=BUCKET, Key="probe/big", ChecksumMode="ENABLED")
    assert parts == 3 and head["ETag"].endswith('-3"')
    assert base64.b64decode(head["ChecksumSHA256"]).hex() == want  # no -3 on HEAD
    assert got["ChecksumSHA256"] == head["ChecksumSHA256"] + "-3" and got["ChecksumType"] == "COMPOSITE"
    got["Body"].close()
    refused = []
    for key, condition in [("probe/a", {"IfNoneMatch": "*"}), ("probe/a", {"IfMatch": '"0123"'}),
                           ("probe/none", {"IfMatch": '"0123"'})]:
        with pytest.raises(ClientError) as err:
            client.put_object(Bucket=BUCKET, Key=key, Body=b"x", **condition)
        refused.append((err.value.response["Error"]["Code"], err.value.response["ResponseMetadata"]["HTTPStatusCode"]))
    assert refused == [("PreconditionFailed", 412), ("PreconditionFailed", 412), ("NoSuchKey", 404)]
    etag = client.head_object(Bucket=BUCKET, Key="probe/a")["ETag"]
    client.put_object(Bucket=BUCKET, Key="probe/a", Body=b"y", IfMatch=etag)  # the current ETag: accepted
    # a checksum the client claims is kept as it is (AWS would refuse it: BadDigest)
    claimed = base64.b64encode(bytes(32)).decode()
    client.put_object(Bucket=BUCKET, Key="probe/c", Body=data, ChecksumAlgorithm="SHA256", ChecksumSHA256=claimed)
    assert client.head_object(Bucket=BUCKET, Key="probe/c", ChecksumMode="ENABLED")["ChecksumSHA256"] == claimed
    # ... but a read-back meets it: botocore checks the body against it as it streams
    with pytest.raises(DeployError, match=r"^S3 read of s3://models/probe/c failed: FlexibleChecksumError"):
        parse_target(f"s3://{BUCKET}/probe").read("c")
    client.delete_object(Bucket=BUCKET, Key="probe/c")


def test_conditional_writes_of_both_stores(target):
    """put_bytes(if_absent=) / (if_match=tag) on S3 and in a folder: a refused condition is a Conflict and writes
    nothing."""
    store = parse_target(target)
    store.put_bytes("m/x.json", b"1", if_absent=True)
    with pytest.raises(Conflict):
        store.put_bytes("m/x.json", b"2", if_absent=True)
    data, tag = store.read_tagged("m/x.json")
    assert data == b"1"
    store.put_bytes("m/x.json", b"3", if_match=tag)
    with pytest.raises(Conflict):
        store.put_bytes("m/x.json", b"4", if_match=tag)  # stale: it changed since that read
    with pytest.raises(Conflict):
        store.put_bytes("m/gone.json", b"5", if_match=tag)
    assert contents(target) == {"m/x.json": b"3"}


def test_the_client_uses_standard_retries_and_retries_what_it_should(s3):
    default = parse_target(f"s3://{BUCKET}/r")
    assert default.client.meta.config.retries == {"mode": "standard", "total_max_attempts": 5}
    assert load_config(None).deploy.max_attempts == 5
    store = parse_target(f"s3://{BUCKET}/r", DeployConfig(max_attempts=2))
    assert store.client.meta.config.retries == {"mode": "standard", "total_max_attempts": 2}

    class SlowDown:  # S3's throttling answer, a 503 the standard mode retries
        def stream(self, **_):
            yield b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"

    sent: list[str] = []

    def throttled(request, **_):
        sent.append(request.url)
        return AWSResponse(request.url, 503, {}, SlowDown())

    store.client.meta.events.register("before-send.s3.GetObject", throttled)
    with pytest.raises(DeployError, match=r"^S3 read of s3://models/r/m/current.json failed: SlowDown"):
        store.read(f"m/{POINTER}")
    assert len(sent) == 2
    with pytest.raises(Exception, match="max_attempts: expected 1 to 20"):
        DeployConfig(max_attempts=0)


# ------------------------------------------------------------------------------------------------ verification


def test_writes_carry_sha256_checksums_and_verification_says_how(s3, big, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="umo.deploy")
    target = f"s3://{BUCKET}/checksums"
    store = parse_target(target, SMALL)
    files = model_files(tmp_path / "v1", 1, weights=big)
    result = publish(store, "m", "1", files, {}, None)
    # every file, the multipart weights included (its composite against the local file's parts), by S3's checksum
    assert result.verified_by == {f.name: S3_CHECKSUM for f in files}
    assert json.loads(contents(target)[f"m/{POINTER}"])["verified_by"] == result.verified_by
    assert "m/1: MODEL_CARD.md verified by s3-checksum-sha256" in caplog.text
    client = boto3.client("s3")
    for name in [*(f.name for f in files), MANIFEST]:
        head = client.head_object(Bucket=BUCKET, Key=f"checksums/m/1/{name}", ChecksumMode="ENABLED")
        assert head.get("ChecksumSHA256"), name  # every object, manifest included, carries S3's SHA-256
    assert client.head_object(Bucket=BUCKET, Key=f"checksums/m/{POINTER}", ChecksumMode="ENABLED")["ChecksumSHA256"]

    # later, without the local files: a single-PUT object by its checksum (not read), the multipart one read back
    reader = parse_target(target, SMALL)
    gets = counting(reader.client, "before-send.s3.GetObject")
    again = verify_current(SMALL, "m", target=target, s3_client=reader.client)
    assert again.verified_by == {"MODEL_CARD.md": S3_CHECKSUM, "config.json": S3_CHECKSUM,
                                 "pytorch_lora_weights.safetensors": READ_BACK}
    assert sorted(u.rsplit("/", 1)[-1] for u in gets) == [POINTER, MANIFEST, MANIFEST,
                                                          "pytorch_lora_weights.safetensors"]

    # a folder keeps no checksum: every file is read back
    local = publish(parse_target(str(tmp_path / "serve")), "m", "1", files, {}, None)
    assert local.verified_by == {f.name: READ_BACK for f in files}


def test_a_version_folder_is_immutable(target, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="umo.deploy")
    store = parse_target(target)
    first = model_files(tmp_path / "a", 1)
    publish(store, "m", "1", first, {}, None)
    before = contents(target)
    other = model_files(tmp_path / "b", 2)
    with pytest.raises(DeployError, match=r"m/1/manifest.json: version 1 is already deployed with other content "
                                          r"\(files that differ: MODEL_CARD.md, config.json, pytorch_lora_weights"
                                          r".safetensors\); a deployed version is immutable"):
        publish(store, "m", "1", other, {}, read_pointer(store, "m"))
    assert contents(target) == before
    # the same bytes again: fine, and nothing is uploaded twice
    again = publish(store, "m", "1", first, {}, read_pointer(store, "m"))
    assert again.changed and "pytorch_lora_weights.safetensors is already there and verifies" in caplog.text
    assert but_pointer(contents(target)) == but_pointer(before)


def test_a_version_claimed_between_read_and_write_is_refused(s3, tmp_path):
    """Another deployer creates version 2's manifest (other files) after this one found none: S3 refuses this
    one's If-None-Match PUT, and it stops before uploading a file."""
    target = f"s3://{BUCKET}/claim"
    store = parse_target(target)
    publish(store, "m", "1", model_files(tmp_path / "v1", 1), {}, None)
    theirs = model_files(tmp_path / "theirs", 7)
    rival = parse_target(target)

    def claim_first(params, **_):
        if params["Key"].endswith("m/2/manifest.json") and params.get("IfNoneMatch") == "*":
            store.client.meta.events.unregister("provide-client-params.s3.PutObject", claim_first)
            publish(rival, "m", "2", theirs, {}, read_pointer(rival, "m"))

    store.client.meta.events.register("provide-client-params.s3.PutObject", claim_first)
    with pytest.raises(DeployError, match="m/2/manifest.json: version 2 is already deployed with other content"):
        publish(store, "m", "2", model_files(tmp_path / "ours", 8), {}, read_pointer(store, "m"))
    after = contents(target)
    assert json.loads(after[f"m/{POINTER}"])["version"] == "2"  # theirs, verified
    assert after["m/2/config.json"] == (tmp_path / "theirs" / "config.json").read_bytes()


# ------------------------------------------------------------------------------------------------ concurrency

RACER = r"""
import sys, time
from pathlib import Path
from umo.config import DeployConfig
from umo.deploy import DeployError, parse_target, publish, read_pointer

target, version, sync, *files = sys.argv[1:]
sync = Path(sync)
store = parse_target(target, DeployConfig())
pointer = read_pointer(store, "m")
write = store.put_bytes

def at_the_barrier(key, data, **condition):
    if key.endswith("/current.json"):  # both racers have read current.json: both now write it at once
        (sync / f"ready-{version}").touch()
        deadline = time.monotonic() + 30
        while not (sync / "go").exists():
            if time.monotonic() > deadline:
                sys.exit("no go within 30 s")
            time.sleep(0.002)
    return write(key, data, **condition)

store.put_bytes = at_the_barrier
try:
    publish(store, "m", version, [Path(f) for f in files], {}, pointer)
except DeployError as err:
    print(err, file=sys.stderr)
    sys.exit(3)
"""


def wait_for(condition, procs: list[subprocess.Popen], timeout: float = 30.0) -> None:
    """Poll `condition` every 5 ms; fail at once if a process ended first (its output shown)."""
    deadline = time.monotonic() + timeout
    while not condition():
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"exited with {p.returncode} first: {p.communicate()}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_two_deployers_race_and_exactly_one_moves_the_pointer(target, tmp_path):
    """Two processes read current.json (version 1), then write it at the same moment (a barrier), deploying
    versions 2 and 3: S3's If-Match (a folder's flock) lets exactly one through; the other fails clearly and
    changes nothing that readers follow; re-run, it deploys on top."""
    store = parse_target(target)
    publish(store, "m", "1", model_files(tmp_path / "v1", 1), {}, None)
    before = contents(target)
    sync = tmp_path / "sync"
    sync.mkdir()
    files = {v: model_files(tmp_path / f"v{v}", int(v)) for v in ("2", "3")}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, target, v, str(sync), *map(str, files[v])], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in files]
    try:
        wait_for(lambda: all((sync / f"ready-{v}").exists() for v in files), procs)
        (sync / "go").touch()
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = {v: p.returncode for v, p in zip(files, procs)}
    assert sorted(codes.values()) == [0, 3], outs
    winner, loser = sorted(files, key=lambda v: codes[v])
    message = outs[list(files).index(loser)][1]
    assert f"{target}/m/current.json: another deployer changed current.json after this run read it (it pointed " \
           f"at version 1, now at version {winner}); nothing was written to it" in message
    assert "re-run to deploy on top of it" in message and "Traceback" not in message
    pointer = read_pointer(store, "m")
    assert (pointer["version"], pointer["history"]) == (winner, ["1"])
    assert under(contents(target), "m/1/") == under(before, "m/1/")
    assert verify_current(DeployConfig(), "m", target=target).version == winner
    # the loser re-runs: its files are there and verify; only the pointer moves
    assert verify(store, "m", loser) == []
    rerun = publish(store, "m", loser, files[loser], {}, read_pointer(store, "m"))
    assert rerun.pointer["history"] == [winner, "1"]


def test_rollback_writes_the_pointer_conditionally(s3, tmp_path):
    """A deployer moves current.json between rollback's read and its write: S3 refuses rollback's If-Match PUT
    and current.json stays the other deployer's."""
    target = f"s3://{BUCKET}/rollback-race"
    store = parse_target(target)
    publish(store, "m", "1", model_files(tmp_path / "v1", 1), {}, None)
    publish(store, "m", "2", model_files(tmp_path / "v2", 2), {}, read_pointer(store, "m"))
    rival = parse_target(target)
    client = boto3.client("s3")

    def deploy_3_first(params, **_):
        if params["Key"].endswith(f"m/{POINTER}") and "IfMatch" in params:
            client.meta.events.unregister("provide-client-params.s3.PutObject", deploy_3_first)
            publish(rival, "m", "3", model_files(tmp_path / "v3", 3), {}, read_pointer(rival, "m"))

    client.meta.events.register("provide-client-params.s3.PutObject", deploy_3_first)
    with pytest.raises(DeployError, match=r"rollback-race/m/current.json: another deployer changed current.json "
                                          r"after this run read it \(it pointed at version 2, now at version 3\)"):
        rollback(DeployConfig(), "m", target=target, s3_client=client)
    assert read_pointer(store, "m")["version"] == "3"
    assert rollback(DeployConfig(), "m", target=target).version == "2"  # re-run: on top of 3


# ------------------------------------------------------------------------------------------------ faults


def test_wrong_credentials_change_nothing(s3, tmp_path):
    target = f"s3://{BUCKET}/creds"
    store = parse_target(target)
    publish(store, "m", "1", model_files(tmp_path / "v1", 1), {}, None)
    before = contents(target)
    iam = boto3.client("iam", endpoint_url=s3.uri)
    iam.create_user(UserName="deployer")
    key = iam.create_access_key(UserName="deployer")["AccessKey"]["AccessKeyId"]
    files = model_files(tmp_path / "v2", 2)
    s3.check_credentials(True)
    try:
        for key_id, secret, code in [("AKIAUNKNOWNUNKNOWN00", SECRET, "InvalidAccessKeyId"),
                                     (key, WRONG_SECRET, "SignatureDoesNotMatch")]:
            client = boto3.client("s3", aws_access_key_id=key_id, aws_secret_access_key=secret)
            wrong = parse_target(target, s3_client=client)
            for attempt in (lambda: publish(wrong, "m", "2", files, {}, None),
                            lambda: rollback(DeployConfig(), "m", target=target, s3_client=client),
                            lambda: clean_incomplete(DeployConfig(), "m", target=target, s3_client=client)):
                with pytest.raises(DeployError) as err:
                    attempt()
                assert f"failed: {code} (" in str(err.value) and "check the credentials" in str(err.value)
                assert secret not in str(err.value) and "\n" not in str(err.value)
    finally:
        s3.check_credentials(False)
    assert contents(target) == before


def test_a_missing_bucket_changes_nothing(s3, tmp_path):
    target = f"s3://{BUCKET}/bucket"
    publish(parse_target(target), "m", "1", model_files(tmp_path / "v1", 1), {}, None)
    before, buckets = contents(target), boto3.client("s3").list_buckets()["Buckets"]
    with pytest.raises(DeployError, match=r"^S3 read of s3://no-such-umo-bucket/bucket/m/2/manifest.json failed: "
                                          r"NoSuchBucket .*umo does not create buckets"):
        publish(parse_target("s3://no-such-umo-bucket/bucket"), "m", "2", model_files(tmp_path / "v2", 2), {}, None)
    assert contents(target) == before and boto3.client("s3").list_buckets()["Buckets"] == buckets


def champion_version(client, name: str, folder: Path, seed: int, decision: str) -> str:
    """A registered version of `name` with deployable files, a gate decision and the `champion` alias, made
    directly (standing in for register + gate)."""
    experiment = client.get_experiment_by_name(name) or client.get_experiment(client.create_experiment(name))
    run = client.create_run(experiment.experiment_id)
    model_files(folder, seed)
    client.log_artifacts(run.info.run_id, str(folder), "model")
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    mv = client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_model_version_tag(name, mv.version, "gate.decision", decision)
    client.set_registered_model_alias(name, "champion", mv.version)
    return mv.version


@pytest.fixture(scope="module")
def registry(mlflow_service, tmp_path_factory):
    """The session's mlflow server with model umo-s3-ok (champion, passed), umo-s3-failed (champion, failed)."""
    import mlflow

    client = mlflow.MlflowClient(mlflow_service.uri)
    root = tmp_path_factory.mktemp("registry")
    champion_version(client, "umo-s3-ok", root / "ok", 1, "passed")
    champion_version(client, "umo-s3-failed", root / "failed", 2, "failed")
    return client


@pytest.mark.parametrize("name, message", [
    ("umo-s3-never-registered", "umo-s3-never-registered: no version holds `champion`"),
    ("umo-s3-failed", "umo-s3-failed version 1 holds `champion` but has no passed gate decision")])
def test_no_approved_champion_is_refused_before_touching_s3(s3, registry, tmp_path, name, message):
    target = f"s3://{BUCKET}/champion"
    publish(parse_target(target), name, "0", model_files(tmp_path / "v0", 0), {}, None)
    before = contents(target)
    client = boto3.client("s3")
    sent = counting(client)
    config = load_config(None, [f"registry.model_name={name}", f"tracking.tracking_uri={registry.tracking_uri}"])
    with pytest.raises(DeployError, match=message):
        deploy(config.deploy, config.registry, config.tracking, target=target, s3_client=client)
    assert sent == [] and contents(target) == before


def test_a_tampered_object_is_named_and_a_redeploy_repairs_only_it(s3, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="umo.deploy")
    target = f"s3://{BUCKET}/tamper"
    store = parse_target(target)
    publish(store, "m", "1", model_files(tmp_path / "v1", 1), {}, None)
    files = model_files(tmp_path / "v2", 2)
    publish(store, "m", "2", files, {}, read_pointer(store, "m"))
    client = boto3.client("s3")
    key = "tamper/m/2/config.json"
    good = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    before = contents(target)
    # altered by a client that asks S3 for a SHA-256: S3's own checksum gives it away, nothing is read back
    client.put_object(Bucket=BUCKET, Key=key, Body=good.replace(b"4", b"5"), ChecksumAlgorithm="SHA256")
    gets = counting(store.client, "before-send.s3.GetObject")
    with pytest.raises(DeployError, match=r"version 2 does not verify: m/2/config.json: size \d+ sha256 \w+… "
                                          r"\(S3's ChecksumSHA256\) but the manifest says"):
        verify_current(DeployConfig(), "m", target=target, s3_client=store.client)
    assert not any(u.endswith("config.json") for u in gets)
    # altered by a plain PUT (S3 keeps a CRC32 only): read back and hashed
    client.put_object(Bucket=BUCKET, Key=key, Body=good.replace(b"4", b"6"))
    with pytest.raises(DeployError, match=r"m/2/config.json: size \d+ sha256 \w+… but the manifest says"):
        verify_current(DeployConfig(), "m", target=target)
    after = contents(target)
    assert after[f"m/{POINTER}"] == before[f"m/{POINTER}"] and under(after, "m/1/") == under(before, "m/1/")
    # a re-deploy of the same version uploads the altered file again, and only it
    puts = counting(store.client, "before-send.s3.PutObject")
    repaired = publish(store, "m", "2", files, {}, read_pointer(store, "m"))
    assert sorted(u.rsplit("/", 1)[-1] for u in puts) == ["config.json", POINTER]
    assert "m/2/config.json: size" in caplog.text and "uploading it again" in caplog.text
    assert repaired.pointer["history"] == ["1"] and verify_current(DeployConfig(), "m", target=target).version == "2"
    assert but_pointer(contents(target)) == but_pointer(before)


def test_a_new_version_over_a_tampered_one_deploys_but_cannot_roll_back_to_it(s3, tmp_path):
    """Deploying a good version is the remedy, so it is not blocked; the tampered version is left as it is
    (umo never rewrites another version), and rollback refuses it, naming the file."""
    target = f"s3://{BUCKET}/tamper-previous"
    store = parse_target(target)
    publish(store, "m", "1", model_files(tmp_path / "v1", 1), {}, None)
    client = boto3.client("s3")
    client.put_object(Bucket=BUCKET, Key="tamper-previous/m/1/MODEL_CARD.md", Body=b"# edited by hand\n")
    tampered = under(contents(target), "m/1/")
    assert publish(store, "m", "2", model_files(tmp_path / "v2", 2), {}, read_pointer(store, "m")).version == "2"
    before = contents(target)
    assert under(before, "m/1/") == tampered
    with pytest.raises(DeployError, match=r"m/1: cannot roll back, it does not verify: m/1/MODEL_CARD.md: size"):
        rollback(DeployConfig(), "m", target=target)
    assert contents(target) == before


KILLED = r"""
import sys, time
from pathlib import Path
from umo.config import DeployConfig
from umo.deploy import parse_target, publish, read_pointer

target, marker, *files = sys.argv[1:]
store = parse_target(target, DeployConfig(multipart_threshold_mb=5, multipart_chunk_mb=5))

def after_a_part(**_):
    Path(marker).touch()  # one part is in S3: now wait for SIGKILL
    time.sleep(60)

store.client.meta.events.register("after-call.s3.UploadPart", after_a_part)
publish(store, "m", "2", [Path(f) for f in files], {}, read_pointer(store, "m"))
"""


def test_an_upload_killed_midway_leaves_the_pointer_and_a_rerun_completes(s3, big, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="umo.deploy")
    target = f"s3://{BUCKET}/killed"
    store = parse_target(target, SMALL)
    publish(store, "m", "1", model_files(tmp_path / "v1", 1), {}, None)
    before = contents(target)
    files = model_files(tmp_path / "v2", 2, weights=big)
    marker = tmp_path / "one-part-uploaded"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, target, str(marker), *map(str, files)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(marker.exists, [proc])
    finally:
        proc.send_signal(signal.SIGKILL)
        out = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, out
    after = contents(target)
    assert after[f"m/{POINTER}"] == before[f"m/{POINTER}"] and under(after, "m/1/") == under(before, "m/1/")
    assert "m/2/pytorch_lora_weights.safetensors" not in after  # a multipart object exists only once completed
    client = boto3.client("s3")
    assert [u["Key"] for u in client.list_multipart_uploads(Bucket=BUCKET, Prefix="killed/").get("Uploads", [])] == \
        ["killed/m/2/pytorch_lora_weights.safetensors"]
    assert verify_current(SMALL, "m", target=target).version == "1"

    assert clean_incomplete(SMALL, "m", target=target) == 1
    assert client.list_multipart_uploads(Bucket=BUCKET, Prefix="killed/").get("Uploads", []) == []
    done = publish(store, "m", "2", files, {}, read_pointer(store, "m"))
    assert "holds these files already: completing or repairing that version" in caplog.text
    assert done.pointer["history"] == ["1"] and done.verified_by["pytorch_lora_weights.safetensors"] == S3_CHECKSUM
    assert verify_current(SMALL, "m", target=target).version == "2"
    assert under(contents(target), "m/1/") == under(before, "m/1/")


# ------------------------------------------------------------------------------------------------ secrets


DEBUG_DEPLOYER = r"""
import logging, sys
from pathlib import Path
from umo.config import DeployConfig
from umo.deploy import DeployError, parse_target, publish, read_pointer, rollback, verify_current

logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
target, *files = sys.argv[1:]
store = parse_target(target)
print(publish(store, "m", "1", [Path(f) for f in files], {}, read_pointer(store, "m")))
print(verify_current(DeployConfig(), "m", target=target))
for bad in (lambda: rollback(DeployConfig(), "m", target=target),
            lambda: publish(parse_target("s3://no-such-umo-bucket/x"), "m", "1", [Path(f) for f in files], {}, None)):
    try:
        bad()
    except DeployError as err:
        print(err)
"""


def test_no_secret_reaches_a_log_a_file_an_object_or_the_registry(s3, registry, tmp_path, tmp_path_factory, caplog):
    """With AWS_SECRET_ACCESS_KEY a marker: deploys that succeed and fail (in this process, DEBUG logging
    captured, botocore's included; and in a subprocess, its stdout and stderr), then every output is searched."""
    caplog.set_level(logging.DEBUG)
    files = model_files(tmp_path / "files", 5)
    proc = subprocess.Popen([sys.executable, "-c", DEBUG_DEPLOYER, f"s3://{BUCKET}/secret-child", *map(str, files)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        config = load_config(None, ["registry.model_name=umo-s3-ok", f"tracking.tracking_uri={registry.tracking_uri}"])
        first = deploy(config.deploy, config.registry, config.tracking, target=f"s3://{BUCKET}/secret")
        assert first.changed and list(first.verified_by.values()) == [S3_CHECKSUM] * 3
        assert not deploy(config.deploy, config.registry, config.tracking, target=f"s3://{BUCKET}/secret").changed
        deploy(config.deploy, config.registry, config.tracking, target=str(tmp_path / "serve"))
        errors = []
        with pytest.raises(DeployError) as err:
            deploy(config.deploy, config.registry, config.tracking, target="s3://no-such-umo-bucket/secret")
        errors.append(str(err.value))
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "DEBUG botocore" in stderr and "NoSuchBucket" in stdout and "nothing to roll back" in stdout
    s3.check_credentials(True)  # the access key is unknown to the server now; its secret is the marker
    try:
        with pytest.raises(DeployError) as err:
            deploy(config.deploy, config.registry, config.tracking, target=f"s3://{BUCKET}/secret-auth")
        errors.append(str(err.value))
    finally:
        s3.check_credentials(False)

    assert "InvalidAccessKeyId" in errors[1]
    outputs = {"captured logs": caplog.text, "errors": "\n".join(errors), "stdout": stdout, "stderr": stderr}
    for path in [*tmp_path_factory.getbasetemp().rglob("*"), *Path(tempfile.gettempdir()).glob("umo-deploy-*/**/*")]:
        if path.is_file():
            outputs[str(path)] = path.read_bytes().decode(errors="replace")
    client = boto3.client("s3")
    for bucket in client.list_buckets()["Buckets"]:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket["Name"]):
            for o in page.get("Contents", []):
                got = client.get_object(Bucket=bucket["Name"], Key=o["Key"])
                outputs[f"s3://{bucket['Name']}/{o['Key']}"] = got["Body"].read().decode(errors="replace") + \
                    json.dumps(got["Metadata"])
    for experiment in registry.search_experiments():
        for run in registry.search_runs([experiment.experiment_id]):
            outputs[f"run {run.info.run_id}"] = json.dumps([run.data.params, run.data.tags])
    for model in registry.search_registered_models():
        outputs[f"model {model.name}"] = json.dumps([model.tags, model.description])
        for mv in registry.search_model_versions(f"name = '{model.name}'"):
            outputs[f"{model.name} {mv.version}"] = json.dumps([mv.tags, mv.description, mv.source])
    assert len(outputs) > 20 and any(k.startswith("s3://models/secret-child/") for k in outputs)
    assert "umo-s3-test-key" in caplog.text  # botocore's DEBUG lines are there (the key id, not the secret)
    leaks = [where for where, text in outputs.items() if SECRET in text or WRONG_SECRET in text]
    assert not leaks
