#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs the lock, constraints.txt (ONE pip resolve of umo with its test
# extras, torch pinned to the exact build that pip finds locally), then umo: nothing upgrades anything behind
# our back. Idempotent: a second run with unchanged inputs returns in a second.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${UMO_VENV:-.venv}
UV_VERSION=0.13.9  # the installer of the lock (below); not part of the lock: nothing imports it
extras=${UMO_EXTRAS:-test}
py=${PYTHON:-}
if [ -z "$py" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      py=$candidate; break
    fi
  done
fi
[ -n "$py" ] || { echo "setup: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

# The registry UI test drives Debian's chromium (headless). Installed once, when we may (root, apt), and only
# for the tests: `make run` and `make ablation` set UMO_BROWSER=0 (they never open a browser).
if [[ "$extras" == *test* ]] && [ "${UMO_BROWSER:-1}" != 0 ] && ! command -v chromium >/dev/null && command -v apt-get >/dev/null \
    && [ "$(id -u)" = 0 ]; then
  apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
    || echo "setup: could not install chromium (apt); the registry UI test needs it" >&2
fi

stamp="$venv/.umo-installed"
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)-$extras
if ! { [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; }; then
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  # --no-compile: pip compiles every file of every package, one at a time (3.5 min for the install instead of
  # 1.8, measured on 2 cores); Python compiles the modules a process imports, once, when it may write bytecode
  # (the Makefile's targets make sure it may: see PYTHONDONTWRITEBYTECODE there).
  # The lock (constraints.txt: one resolve of everything with the test extras, written by `make lock`) is
  # installed as it is, without resolving it again (--no-deps: 2.5 min instead of 3.7 on 2 cores), then umo
  # itself; `pip check` then proves the set consistent: a requirement of pyproject.toml that the lock lacks or
  # contradicts stops the set-up here, not at an import later.
  # uv installs the same pinned wheels in seconds where pip takes minutes (measured on 2 cores: 9 s against
  # about 150 s); it ignores pip's configuration, so pip's find-links (where a local torch build may lie) are
  # passed on. pip installs them itself where uv cannot be had.
  if "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-compile "uv==$UV_VERSION" \
      >/dev/null 2>&1; then
    links=()
    while read -r link; do [ -n "$link" ] && links+=(--find-links "$link"); done \
      < <("$venv/bin/python" -m pip config get global.find-links 2>/dev/null | tr ' ' '\n')
    "$venv/bin/uv" pip install --quiet --python "$venv/bin/python" --no-deps "${links[@]}" -r constraints.txt
  else
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-compile --no-deps -r constraints.txt
  fi
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-compile --no-deps \
    --no-build-isolation -e .
  "$venv/bin/python" -m pip check >/dev/null || { "$venv/bin/python" -m pip check >&2; exit 1; }
  "$venv/bin/python" -c 'import torch; assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__'
  echo "$want" > "$stamp"
fi

# The embedded default's raw collection. data/ is tracked by data.dvc and there is no DVC remote for it, so a
# fresh clone recreates it, byte for byte (its DVC hash equals data.dvc's: tests/test_default_data.py), in ~8 s.
if [ ! -e data ]; then
  "$venv/bin/umo" toyworld raw --out data --truth artifacts/toy_raw_truth.jsonl >/dev/null
fi
