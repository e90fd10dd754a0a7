#!/bin/sh
# A pinned clone's DVC set-up on a worker host (infra/prefect-pinned.yaml runs it in the clone):
# - UMO_DVC_CACHE: the host's shared DVC cache (outputs already made are linked, not made again);
# - a configured default remote: its data and outputs are pulled (missing ones are made by the run).
set -eu
if [ -n "${UMO_DVC_CACHE:-}" ]; then
    python -m dvc config --local cache.dir "$UMO_DVC_CACHE"
    python -m dvc config --local cache.shared group
fi
if [ -n "$(python -m dvc remote default 2>/dev/null || true)" ]; then
    python -m dvc pull --allow-missing
else
    python -m dvc checkout --allow-missing >/dev/null 2>&1 || true
fi
echo "umo clone at $(git rev-parse HEAD) ready in $(pwd)"
