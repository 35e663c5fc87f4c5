# One entry point for set-up, demo and tests. Every target installs what it needs first.
# torch is installed before anything else: a bare `torch` requirement on a machine without torch
# pulls the newest CUDA build (gigabytes). Override TORCH_SPEC on a GPU machine, e.g.
#   make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.medvol-installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast test-monailabel gpu-check lint dist clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev,text]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/medvol demo --output demo_output

test: setup
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

# The tests not marked slow (no bundle runs, no training loops): about a minute on 2 quiet cores.
test-fast: setup
	$(BIN)/python -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

# The real MONAI Label (0.8.5) in its own environment (.venv-monailabel, CUDA torch + torchvision, ~5 GB):
# not part of `make test` / CI; see docs/monailabel.md.
test-monailabel:
	scripts/test_monailabel.sh $(PYTEST_ARGS)

# The GPU paths CI cannot run (CUDA + AMP training of every bundle, faiss k-means on the GPU, the multi_gpu_train
# overlay with NCCL under torchrun): a few minutes on a GPU machine; exit 3 without a CUDA device (nothing run).
# Needs the GPU builds: make setup TORCH_SPEC=... then pip install -e ".[gpu]" (docs/installation.md).
gpu-check: setup
	$(BIN)/python scripts/gpu_check.py --output gpu_check_output

lint: setup
	$(BIN)/ruff check medvol tests benchmarks scripts
	$(BIN)/python scripts/bundle_config_stats.py --check

# The wheel and sdist of medvol-ssl in dist/ (bundles/ and demo_data/ inside, see setup.py). build/ is removed
# first: setuptools never deletes files left there by an earlier build, and the wheel would ship them.
dist: setup
	rm -rf build dist *.egg-info
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w dist .
	$(BIN)/python -c "from setuptools import build_meta as b; b.build_sdist('dist')"
	rm -rf build *.egg-info

clean:
	rm -rf demo_output gpu_check_output .pytest_cache build dist *.egg-info
