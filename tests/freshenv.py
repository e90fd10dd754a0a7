"""A fresh virtual environment that holds exactly what a list of requirements asks for, made offline.

`python -m venv` makes the environment; its site-packages then receive, as symbolic links into this test run's
environment, the distributions the requirements name and, transitively, the ones those require (read from the
installed metadata, markers evaluated as pip would: no extras unless asked for). What pip would install from
PyPI, at the versions pinned, without downloading anything. umo is not among them unless asked for, so a model
that imports umo works there only if it carries umo itself. Console scripts (uvicorn, ...) are written into its
bin/ for its own interpreter.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def closure(requirements: list[str]) -> dict[str, object]:
    """canonical name -> importlib Distribution of every distribution the requirements need (pins checked)."""
    found: dict[str, object] = {}
    todo = [(Requirement(r), frozenset()) for r in requirements]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        req, _ = todo.pop()
        name = canonicalize_name(req.name)
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = distribution(req.name)
        except PackageNotFoundError as err:
            raise AssertionError(f"{req}: required, but not installed in this environment") from err
        version = dist.version.split("+")[0]
        assert req.specifier.contains(version, prereleases=True), f"{req}: this environment has {dist.version}"
        found[name] = dist
        for text in dist.requires or []:
            sub = Requirement(text)
            extras = [""] + sorted(req.extras)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                todo.append((sub, frozenset()))
    return found


def fresh_venv(root: Path, requirements: list[str]) -> Path:
    """The environment's python, in `root`, holding the closure of `requirements` (see the module docstring)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for dist in closure(requirements).values():
        base = Path(dist.locate_file(""))
        # its top-level names (packages, modules, *.libs, its .dist-info); a namespace folder that several
        # distributions share (google/, ruamel/) is linked whole, with its other members
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in sorted(tops):
            src, dst = base / top, site / top
            if src.exists() and not dst.exists() and top != "__pycache__":
                dst.symlink_to(src)
        for ep in dist.entry_points.select(group="console_scripts"):
            module, _, attr = ep.value.partition(":")
            script = root / "bin" / ep.name
            script.write_text(f"#!{python}\nimport sys\nfrom {module} import {attr.split('.')[0]}\n"
                              f"sys.exit({attr}())\n")
            script.chmod(0o755)
    return python


def path_without(prefix: Path, path: str) -> str:
    """PATH without the folders under `prefix` (this test run's own environment)."""
    return ":".join(p for p in path.split(":") if p and not Path(p).resolve().is_relative_to(prefix.resolve()))


def pinned(text: str) -> list[str]:
    """A requirements.txt's requirement lines."""
    return [line.strip() for line in text.splitlines() if line.strip() and not re.match(r"\s*(#|-)", line)]
