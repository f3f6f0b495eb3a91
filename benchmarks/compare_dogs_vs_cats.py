"""The paper's comparison on real photographs, sized for a CPU session.

Runs ``porder compare`` on the 1,000 Kaggle Dogs-vs-Cats JPEGs in
../shared/data/dogs-vs-cats-1k at 32x32: measures ``none`` (baseline), ``mi``
and ``random`` (control), patch 8, VGG-16-BN at width 0.125, 3 seeds, the
same hyperparameters for every run; then prints ``summary.md``. On a 2-core
CPU it takes about 10 minutes; run it again to resume an interrupted run.

Equivalent command::

    porder compare ../shared/data/dogs-vs-cats-1k -m none,mi,random -p 8 -a vgg \\
        --seeds 3 --width 0.125 --steps 1000 -b 32 --lr 1e-4 --eval-every 25 \\
        --size 32 --test-fraction 0.2 -o benchmarks/results/dogs-vs-cats
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The 1,000 Dogs-vs-Cats photographs: $PORDER_PHOTOS, else ../shared/data beside the repo.
DOGS = Path(os.environ.get("PORDER_PHOTOS") or ROOT.parent / "shared" / "data" / "dogs-vs-cats-1k")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=str(DOGS))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dogs-vs-cats")
    ap.add_argument("--arch", default="vgg")
    ap.add_argument("--width", type=float, default=0.125)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    if not Path(args.source).exists():
        sys.exit(f"{args.source} is absent: nothing to compare")

    from porder.experiment import compare

    t0 = time.perf_counter()
    log = lambda line: print(f"[{time.perf_counter() - t0:6.0f} s] {line}", file=sys.stderr,
                             flush=True)

    def progress_for(desc):
        def report(step, total, stats):
            if stats is not None and "test_acc" in stats and step % (args.eval_every * 8) == 0:
                log(f"{desc}: step {step}/{total} test acc {100 * stats['test_acc']:.1f}%")
        return report

    res = compare(args.source, args.out, measures=["none", "mi", "random"], patches=[8],
                  archs=[args.arch], seeds=args.seeds, steps=args.steps, width=args.width,
                  lr=args.lr, batch_size=args.batch_size, eval_every=args.eval_every, size=32,
                  test_fraction=args.test_fraction, device=args.device, dry_run=args.dry_run,
                  log=log, progress_for=progress_for)
    if args.dry_run:
        print(res.describe())
        return
    print((args.out / "summary.md").read_text())
    log(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
