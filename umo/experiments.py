"""A run of the chain with other settings, as a DVC experiment in a workspace of its own.

The checkout's params.yaml is the committed settings: the nightly retrain reads it, and a registration from a
modified one carries a `-dirty` commit. So settings that differ for one run never touch it. `Experiment.open`
makes a git worktree of HEAD under `.dvc/tmp/umo-exps/<name>`, points its DVC cache at the checkout's (nothing
is copied twice), carries the checkout's pipeline state over (its dvc.lock, the outputs DVC keeps out of its
cache), restores the cached outputs, and writes the overrides into the worktree's params.yaml. The stages then run
there, with $DVC_ROOT set to the checkout: umo resolves its shared state (the default MLflow store, a local
deployment folder) against $DVC_ROOT, so an experiment registers into the same registry, as DVC's own queue does.
`save` records it as a DVC experiment of the checkout's HEAD (`dvc exp show` lists it, with its params and
metrics) and removes the worktree. A failed experiment's worktree stays: the same overrides again continue in it
(training resumes from its checkpoints).

    exp = Experiment.open(Path("."), ["train.learning_rate=0.0002"])
    ... run the stages with cwd=exp.workspace, env=exp.env() ...
    exp.save(["train", "evaluate"])   # the stages that ran: their outputs go to the shared cache
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from umo.config import ConfigError, load_config, write_overrides

log = logging.getLogger(__name__)

EXPS_DIR = Path(".dvc") / "tmp" / "umo-exps"


class ExperimentError(RuntimeError):
    """git or DVC refused a step of the experiment's workspace."""


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise ExperimentError(f"{' '.join(cmd)} (in {cwd}) exited {out.returncode}: "
                              f"{(out.stderr or out.stdout).strip()[-2000:]}")
    return out.stdout


def _dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def experiment_name(head: str, overrides: list[str]) -> str:
    """umo-<8 hex>: the same commit and overrides give the same name (a rerun continues the same experiment).

    >>> experiment_name("0" * 40, ["train.learning_rate=0.0002"])
    'umo-02b49e88'
    """
    key = json.dumps([head, sorted(overrides)])
    return "umo-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def _lock_outs(lock: Path) -> list[str]:
    """Every output path that dvc.lock records (DVC-cached or not)."""
    if not lock.is_file():
        return []
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return [out["path"] for stage in stages.values() for out in stage.get("outs", [])]


@dataclass
class Experiment:
    project: Path  # the checkout
    workspace: Path  # the experiment's git worktree
    name: str
    overrides: list[str]
    baseline: str  # the checkout's HEAD

    @classmethod
    def open(cls, project: Path, overrides: list[str], name: str | None = None) -> "Experiment":
        """The experiment's workspace, ready to run (see the module docstring); a ConfigError for a bad override
        before anything is made."""
        project = Path(project).resolve()
        load_config(project / "params.yaml", overrides)  # a bad key or value: ConfigError, nothing made
        try:
            head = _run(["git", "rev-parse", "HEAD"], project).strip()
        except ExperimentError as err:
            raise ConfigError(f"{project}: overrides run as a DVC experiment of the checkout's git commit, and "
                              f"this checkout has none ({err})") from None
        name = name or experiment_name(head, overrides)
        workspace = project / EXPS_DIR / name
        exp = cls(project, workspace, name, list(overrides), head)
        if (workspace / ".git").exists():
            log.info("experiment %s: continuing in %s (an earlier run of these overrides did not finish)", name,
                     workspace)
        else:
            try:
                exp._make()
            except BaseException:  # a half-made workspace is never continued
                if workspace.exists():
                    exp.remove()
                raise
        write_overrides(workspace / "params.yaml", overrides)
        return exp

    def _make(self) -> None:
        dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], self.project).splitlines()
        code = [line[3:] for line in dirty if not line[3:].startswith(("dvc.lock", "params.yaml"))]
        if code:
            log.warning("experiment %s: runs the committed code of %s; uncommitted changes of %s are not in it",
                        self.name, self.baseline[:8], ", ".join(code[:5]))
        self.workspace.parent.mkdir(parents=True, exist_ok=True)
        _run(["git", "worktree", "add", "--detach", "--force", str(self.workspace), self.baseline], self.project)
        local = self.project / ".dvc" / "config.local"  # remotes' credentials, if the checkout has any
        if local.is_file():
            shutil.copy2(local, self.workspace / ".dvc" / "config.local")
        _run(_dvc("config", "--local", "cache.dir", str(self.project / ".dvc" / "cache")), self.workspace)
        # The checkout's pipeline state: its dvc.lock (the stages it ran since the commit), and the outputs
        # that DVC does not cache (metrics, records), copied; the cached ones are restored from the shared cache.
        lock = self.project / "dvc.lock"
        if lock.is_file():
            shutil.copy2(lock, self.workspace / "dvc.lock")
        for rel in _lock_outs(lock):
            src, dst = self.project / rel, self.workspace / rel
            if src.is_file() and not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        targets = ["dvc.yaml", *(p.name for p in self.workspace.glob("*.dvc") if p.is_file())]  # data.dvc, ...
        _run(_dvc("checkout", "--allow-missing", "-q", *targets), self.workspace)  # missing in the cache: rerun
        log.info("experiment %s: workspace %s (HEAD %s, shared cache)", self.name, self.workspace, self.baseline[:8])

    def env(self) -> dict[str, str]:
        """The stages' environment: $DVC_ROOT is the checkout (umo's shared state resolves there); DVC_EXP_NAME."""
        return {"DVC_ROOT": str(self.project), "DVC_EXP_NAME": self.name, "DVC_EXP_BASELINE_REV": self.baseline}

    def save(self, stages: list[str]) -> str:
        """Record the workspace as the DVC experiment `name` of the checkout's HEAD, committing the outputs of
        `stages` to the shared cache; remove the worktree. Returns the experiment's git ref."""
        metrics = _untracked_metrics(self.workspace)
        cmd = _dvc("exp", "save", "-f", "-n", self.name, *(x for m in metrics for x in ("-I", m)), *stages)
        _run(cmd, self.workspace, os.environ | self.env())
        ref = f"refs/exps/{self.baseline[:2]}/{self.baseline[2:]}/{self.name}"
        log.info("experiment %s saved (%s); `dvc exp show` lists it, `dvc exp apply %s` brings it into a checkout",
                 self.name, ref, self.name)
        self.remove()
        return ref

    def remove(self) -> None:
        _run(["git", "worktree", "remove", "--force", str(self.workspace)], self.project)


def _untracked_metrics(workspace: Path) -> list[str]:
    """The metrics and params-like JSON files dvc.yaml declares with `cache: false` and git does not track (so
    `dvc exp show` has the experiment's numbers)."""
    lock = workspace / "dvc.lock"
    paths = [p for p in _lock_outs(lock) if p.endswith(".json") and (workspace / p).is_file()]
    if not paths:
        return []
    tracked = set(_run(["git", "ls-files", "--", *paths], workspace).splitlines())
    return [p for p in paths if p not in tracked]
