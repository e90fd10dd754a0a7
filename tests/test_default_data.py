"""The embedded default's raw collection: `umo toyworld raw` recreates `data/` with the exact DVC hash that the
committed `data.dvc` records (DVC's own hashing, in a scratch DVC repository)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_toyworld_raw_recreates_the_data_dvc_hash(default_raw, tmp_path):
    data, truth = default_raw  # `umo toyworld raw --params params.yaml` (conftest; test_prepare clusters it too)
    assert truth.is_file() and not (data / "truth.jsonl").exists()
    shutil.copytree(data, tmp_path / "data")  # DVC's scratch repository gets its own copy
    subprocess.run([BIN / "dvc", "init", "--no-scm", "-q"], check=True, cwd=tmp_path)
    subprocess.run([BIN / "dvc", "config", "core.analytics", "false"], check=True, cwd=tmp_path)
    subprocess.run([BIN / "dvc", "add", "-q", "data"], check=True, cwd=tmp_path)
    rebuilt = yaml.safe_load((tmp_path / "data.dvc").read_text())["outs"][0]
    committed = yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]
    assert (rebuilt["md5"], rebuilt["nfiles"], rebuilt["size"]) == (committed["md5"], committed["nfiles"],
                                                                     committed["size"])


def test_toyworld_raw_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "data" / "album").mkdir(parents=True)
    (tmp_path / "data" / "album" / "mine.png").write_bytes(b"x")
    done = subprocess.run([BIN / "umo", "toyworld", "raw", "--params", ROOT / "params.yaml", "--out",
                           tmp_path / "data", "--truth", tmp_path / "truth.jsonl"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "not empty" in done.stderr
    assert (tmp_path / "data" / "album" / "mine.png").read_bytes() == b"x"
