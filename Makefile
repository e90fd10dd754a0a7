VENV ?= .venv
PY := $(VENV)/bin/python
# Python writes the bytecode of what it imports, once, for every later process (the venv is installed without
# it). Where PYTHONDONTWRITEBYTECODE is set, as on many CI machines, nothing would be kept, and each of the
# hundreds of processes that the chain and the tests start would compile torch, diffusers and mlflow again (a
# fresh clone's make test: 12.8 min of pytest instead of 7.1).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup run ablation test test-fast test-world bench lock clean

setup:
	bash scripts/setup.sh

# The main job: the whole chain (dvc.yaml) on the embedded default, then where everything is.
run:
	@UMO_BROWSER=0 bash scripts/setup.sh
	@start=$$(date +%s); PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro && \
	  $(PY) scripts/summary.py $$(( $$(date +%s) - start ))

# The toy-world ablation SFT vs SIR vs MIMR (ablation/dvc.yaml; results in docs/ablation.md).
ablation:
	@UMO_BROWSER=0 bash scripts/setup.sh
	@start=$$(date +%s); PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro ablation/dvc.yaml && \
	  echo "ablation: $$(( $$(date +%s) - start )) s wall; results: docs/ablation.md"

# The suite on TEST_WORKERS processes (pytest-xdist), each test module whole on one of them, in conftest's order.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow"

# Train the tests' small toy world from scratch and keep its models in tests/fixtures (after a change to the toy
# world's or the face pipeline's sources; test_toyworld_build says when). Commit what it writes.
test-world: setup
	$(PY) tests/toyworlds.py --refresh

bench: setup
	$(PY) benchmarks/reward.py
	$(PY) benchmarks/toyworld_build.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/prepare.py
	$(PY) benchmarks/eval.py

# Re-resolve every dependency (one resolve, torch pinned) and write the lock, constraints.txt (setuptools
# included: torch needs a newer one than venv's; pip itself excluded), which `make setup` installs as it is.
lock:
	rm -rf /tmp/umo-lock && python3.11 -m venv /tmp/umo-lock
	/tmp/umo-lock/bin/pip install --quiet -e ".[test]"
	/tmp/umo-lock/bin/pip freeze --all --exclude-editable | grep -v -e '^-e' -e '^pip==' | sed -E 's/^torch==([0-9.]+)\+.*/torch==\1/' | sort > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
