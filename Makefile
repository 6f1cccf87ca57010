# twinserve: `make up` runs the product, `make test` runs the tests. Both build .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch first and pinned: pip takes the CPU build from this machine's wheel folder; if
# pip met torch only as our `torch>=2.5` requirement it could pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
PIP    := $(BIN)/python -m pip --disable-pip-version-check
# Rebuilt when pyproject.toml changes (new deps, new console scripts); otherwise `make venv`
# is a no-op. The editable install picks up new modules under src/ without a reinstall.
STAMP  := $(VENV)/.twinserve-installed

.PHONY: venv kernels model up test test-ray lint clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@echo "installing $(TORCH), then twinserve (editable) with its dev tools..."
	$(PIP) install -q '$(TORCH)'
	$(PIP) install -q -e '.[dev]'
	touch $@

# the engine's compiled CPU decode kernels (src/twinserve/engine/csrc), built once per machine
# (~15 s); without a compiler the engine runs its pure-PyTorch path, so a failed build is no error
kernels: venv
	$(BIN)/python -m twinserve.engine.fused || echo "the engine will run pure PyTorch"

model: venv
	$(BIN)/twinserve model default

# the mission on the embedded defaults: registers the default model as llm-twin@champion (once),
# deploys it as endpoint `twin` (autoscaling 1..2 replicas behind one router URL), streams one
# answer through it, runs one async job, ingests docs/ and starts the RAG service in front of it
# (one question, answered with sources), prints the URLs and curl commands, serves until Ctrl-C,
# then deletes it
up: venv kernels model
	$(BIN)/twinserve up

# three workers, a test file each at a time: most tests wait on model processes starting (with two,
# a 2-core run kept the CPUs ~77% busy), so three files overlap well on 2 cores; a file's
# module-scoped fixtures (an endpoint, a server) start once (the longest files first: see
# SLOW_FILES_FIRST in tests/conftest.py). Then the engine's unit tests once more on its
# pure-PyTorch path, the fallback where the kernels cannot be built.
test: venv kernels
	$(BIN)/python -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder --durations=25
	TWINSERVE_FUSED_KERNELS=0 $(BIN)/python -m pytest -q -n 2 --dist loadfile tests/unit/engine

# the Ray suite alone (tests/ray inside `unshare -n`, ~2 min), with its output (`make test` runs it too)
test-ray: venv
	$(BIN)/python -m pytest -q -p no:xdist -s tests/test_ray_suite.py

lint: venv
	$(BIN)/ruff check src tests

clean-venv:
	rm -rf $(VENV)
