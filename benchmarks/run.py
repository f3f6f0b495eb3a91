"""Run every benchmark and write their JSON into one folder (``make bench``).

Each benchmark is also runnable alone: ``python benchmarks/bench_core.py --help``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["bench_core", "bench_kernels", "bench_equivalence", "bench_reorder", "bench_e2e", "bench_train",
           "bench_scale", "bench_lockstep"]


def load(name):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    # Registered under its name, so that process pools can pickle its functions
    # (bench_e2e's plain loop) as the same objects.
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--quick", action="store_true", help="smaller, faster runs")
    ap.add_argument("--only", nargs="*", default=None, help="benchmark names to run")
    args = ap.parse_args()
    summary = {}
    for name in args.only or BENCHES:
        if not (HERE / f"{name}.py").exists():
            continue
        t0 = time.perf_counter()
        print(f"== {name}", file=sys.stderr, flush=True)
        argv = ["--out", str(args.out)] + (["--quick"] if args.quick else [])
        load(name).main(argv)
        summary[name] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "index.json").write_text(json.dumps({"seconds": summary}, indent=2))
    print(f"results in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
