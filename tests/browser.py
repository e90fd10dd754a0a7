"""A real headless Chromium (Debian's package, installed by scripts/setup.sh) rendering a page of the MLflow UI:
the DOM after the page's scripts ran, as a reviewer's browser would show it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path


def dump_dom(url: str, profile: Path, *, screenshot: Path | None = None, height: int = 1100,
             budget_ms: int = 20_000) -> str:
    """The rendered DOM of `url` (and a PNG of it when `screenshot` is given), after `budget_ms` of the page's
    virtual time (its timers; network answers come in real time)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is required (scripts/setup.sh installs it)"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", f"--window-size=1400,{height}"]
    if screenshot is not None:
        subprocess.run([*flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    return subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120,
                          check=True).stdout


def dump_dom_showing(url: str, profile: Path, wanted: list[str], *, height: int = 1100, attempts: int = 3) -> str:
    """The rendered DOM of `url` once it shows every string of `wanted` (in the DOM, or in its visible text: tags
    as spaces, runs of white space as one): a page that fetches its parts one after another (the run page's image
    charts) may need longer on a loaded machine, so each attempt doubles the budget. Fails naming what is
    missing."""
    budget = 20_000
    for _ in range(attempts):
        dom = dump_dom(url, profile, height=height, budget_ms=budget)
        text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))
        missing = [w for w in wanted if w not in dom and w not in text]
        if not missing:
            return dom
        budget *= 2
    raise AssertionError(f"{url}: after {attempts} renders the page still lacks {missing} "
                         f"(visible text: {re.sub(r'<[^>]+>', ' ', dom)[-600:]!r})")
