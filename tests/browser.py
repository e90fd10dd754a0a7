"""A real headless Chromium (Debian's package, installed by scripts/setup.sh) rendering a page of the MLflow UI:
the DOM after the page's scripts ran, as a reviewer's browser would show it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def dump_dom(url: str, profile: Path, *, screenshot: Path | None = None, height: int = 1100) -> str:
    """The rendered DOM of `url` (and a PNG of it when `screenshot` is given)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is required (scripts/setup.sh installs it)"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=20000", f"--window-size=1400,{height}"]
    if screenshot is not None:
        subprocess.run([*flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    return subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120,
                          check=True).stdout
