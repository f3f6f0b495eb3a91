# porder developer tasks. Every target installs what it needs first.
PY ?= python3
BENCH_OUT ?= benchmarks/results

.PHONY: install test bench lint clean

# torch==2.13.0 is pinned explicitly when torch is missing: a bare `pip install
# torch` would fetch several GB of CUDA wheels on a CPU machine.
install:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	@$(PY) -m pip install -q -e ".[dev]"

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/run.py --out $(BENCH_OUT)

lint: install
	$(PY) -m ruff check porder tests benchmarks

clean:
	rm -rf build *.egg-info .pytest_cache $(BENCH_OUT)
