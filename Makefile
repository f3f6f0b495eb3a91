# porder developer tasks. Every target installs what it needs first.
#
# Python: the active virtual environment when there is one (VIRTUAL_ENV set);
# otherwise .venv here, created on first use with `python3 -m venv .venv`, so
# nothing is installed into the system Python (which Debian 12+ and Ubuntu
# 23.04+ refuse: "externally-managed-environment"). PY=... overrides both.
VENV ?= .venv
ifdef VIRTUAL_ENV
PY ?= python3
else
PY ?= $(VENV)/bin/python
endif
BENCH_OUT ?= benchmarks/results

.PHONY: install venv demo test bench lint docs clean gpu-check gpu-paper

venv:
ifndef VIRTUAL_ENV
ifeq ($(PY),$(VENV)/bin/python)
	@test -x $(PY) || { echo "make: no virtual environment is active (VIRTUAL_ENV is unset): creating $(VENV) (python3 -m venv $(VENV))"; python3 -m venv $(VENV); }
	@echo "make: using the virtual environment $(VENV) (activate it with: . $(VENV)/bin/activate)"
endif
endif

# torch==2.13.0 is pinned explicitly when torch is missing: a bare `pip install
# torch` may fetch several GB of CUDA wheels on a CPU machine (on PyPI the Linux
# wheel depends on the CUDA libraries). For the CPU-only build from PyTorch's own
# index, install it first:
#   $(PY) -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
install: venv
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	@$(PY) -m pip install -q -e ".[dev]"

# porder's main job on built-in data (the 1,797 handwritten digits shipped with porder).
demo: install
	$(PY) -m porder reorder --measure mi --patch 8 --overwrite digits demo.h5
	$(PY) -m porder inspect demo.h5
	$(PY) -m porder show --overwrite demo.h5 -o demo.png

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/run.py --out $(BENCH_OUT)

# On a machine with a CUDA GPU and CuPy: compile, test and time the CUDA kernels
# (logs and JSON in $OUT, default gpu-check-out/; under 7 minutes). Installs
# porder itself without dependencies: such machines are often offline.
gpu-check:
	bash benchmarks/gpu_check.sh

# The paper's whole experiment (compare --preset paper: Inception, batch 1, 10,000 steps,
# 84 runs in lockstep) on a GPU, on the CIFAR-10 subset of benchmarks/cifar_subset.py in
# gpu-data/cifar10-20k (carried to the device); under 10 minutes is the target.
gpu-paper:
	bash benchmarks/gpu_paper.sh

lint: install
	$(PY) -m ruff check porder tests benchmarks

# The documentation site (docs/, mkdocs.yml) into site/, with --strict: a broken
# link, a missing anchor or cross-reference, or a docstring mkdocstrings cannot
# read fails the build. The [docs] extra brings mkdocs-material, mkdocstrings and
# mkdocs-click (which imports porder.cli: porder is installed first, as for test).
docs: install
	@$(PY) -c "import material, mkdocstrings_handlers.python, mkdocs_click" 2>/dev/null \
		|| $(PY) -m pip install -q -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

clean:
	rm -rf build *.egg-info .pytest_cache $(BENCH_OUT) demo.h5 demo.png site
