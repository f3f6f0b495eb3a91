# porder developer tasks. Every target installs what it needs first.
PY ?= python3
BENCH_OUT ?= benchmarks/results

.PHONY: install demo test bench lint clean gpu-check

# torch==2.13.0 is pinned explicitly when torch is missing: a bare `pip install
# torch` would fetch several GB of CUDA wheels on a CPU machine.
install:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	@$(PY) -m pip install -q -e ".[dev]"

# porder's main job on built-in data (scikit-learn's handwritten digits).
demo: install
	$(PY) -m porder reorder --measure mi --patch 8 --overwrite digits demo.h5
	$(PY) -m porder inspect demo.h5
	$(PY) -m porder show demo.h5 -o demo.png

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/run.py --out $(BENCH_OUT)

# On a machine with a CUDA GPU and CuPy: compile, test and time the CUDA kernels
# (logs and JSON in $OUT, default gpu-check-out/; under 7 minutes). Installs
# porder itself without dependencies: such machines are often offline.
gpu-check:
	bash benchmarks/gpu_check.sh

lint: install
	$(PY) -m ruff check porder tests benchmarks

clean:
	rm -rf build *.egg-info .pytest_cache $(BENCH_OUT) demo.h5 demo.png
