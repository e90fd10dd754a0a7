"""An S3 DVC remote with `endpointurl` (as docs/orchestration.md sets it up for MinIO or any S3 API), against moto's S3
server on 127.0.0.1: `dvc push`, then `dvc pull` into a workspace that lost its data and its cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import boto3
import pytest
from servers import MotoServer

SECRET = "umo-dvc-remote-secret-never-written"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = MotoServer(tmp_path_factory.mktemp("moto-dvc")).start()
    try:
        yield server
    finally:
        server.stop()


def dvc(cwd, *args, env):
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"dvc {' '.join(args)}: {out.stdout}\n{out.stderr}"
    return out.stdout


def test_push_and_pull_through_an_s3_remote_with_endpointurl(s3, tmp_path):
    # credentials from the standard chain (here the environment), never in .dvc/config
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {
        "AWS_ACCESS_KEY_ID": "umo-test-key", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=s3.uri, aws_access_key_id="umo-test-key",
                          aws_secret_access_key=SECRET, region_name="us-east-1")
    client.create_bucket(Bucket="umo-data")
    project = tmp_path / "project"
    (project / "data" / "group-a").mkdir(parents=True)
    files = {"data/group-a/0.png": os.urandom(70_000), "data/group-a/captions.jsonl": b'{"file": "0.png"}\n',
             "data/empty.txt": b""}
    for name, data in files.items():
        (project / name).write_bytes(data)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    dvc(project, "init", "-q", env=env)
    dvc(project, "add", "-q", "data", env=env)
    dvc(project, "remote", "add", "-d", "storage", "s3://umo-data/dvc", env=env)
    dvc(project, "remote", "modify", "storage", "endpointurl", s3.uri, env=env)

    dvc(project, "push", env=env)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="umo-data", Prefix="dvc/")["Contents"]]
    assert len(keys) == len(files) + 1 and all(k.startswith("dvc/files/md5/") for k in keys)  # + the .dir listing
    assert SECRET not in (project / ".dvc" / "config").read_text()

    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")
    dvc(project, "pull", env=env)
    assert {name: (project / name).read_bytes() for name in files} == files
    assert "are in sync" in dvc(project, "status", "--cloud", env=env)
