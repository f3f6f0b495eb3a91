"""click commands `porder train` and `porder compare` (registered on the group in porder.cli).

Each parses and validates options, calls one library function
(:func:`porder.train.train`, :func:`porder.experiment.compare`) and reports;
library errors become one-line messages (exit 1). torch is imported only when a
command runs, so ``porder --help`` stays fast.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from ..measures import MEASURES
from ..trainspec import ARCHS, DEVICES, FM_POINTS_HELP, MAX_WIDTH, NORMS, split_items
from .common import (
    SEED,
    FiniteFloat,
    IntRange,
    MeasureChoice,
    command,
    compile_kernels_first,
    emit_json,
    interruptible,
    json_option,
    library_errors,
    option,
)

# The options that `porder train` and `porder compare` share, declared once: destination
# -> (flags, attributes). Each command applies one with `shared_option(name, ...)` at its
# place in its --help, giving the default or help text where the two commands differ.
SHARED_OPTIONS = {
    "width": (("--width",), dict(type=FiniteFloat(min=0, min_open=True, max=MAX_WIDTH),
                                 show_default=True)),
    "lr": (("--lr",), dict(type=FiniteFloat(min=0, min_open=True), default=1e-3,
                           show_default=True, help="Adam learning rate.")),
    "batch_size": (("-b", "--batch-size"), dict(type=IntRange(min=1), default=32,
                                                show_default=True)),
    "steps": (("--steps",), dict(type=IntRange(min=1), default=1000, show_default=True)),
    "eval_every": (("--eval-every",), dict(type=IntRange(min=1), show_default=True)),
    "bins": (("--bins",), dict(type=IntRange(1, 256), default=256, show_default=True)),
    "device": (("--device",), dict(type=click.Choice(DEVICES), default="auto",
                                   show_default=True)),
    "workers": (("-j", "--workers", "--threads"), dict(type=IntRange(min=1), default=None,
                                          old_names=("--threads",),
                                          help="CPU threads porder uses (torch's threads) "
                                               "[default: all cores].")),
    "progress": (("--progress/--no-progress",), dict(default=None)),
    "eval_images": (("--eval-images",), dict(type=IntRange(min=1), default=None, metavar="N")),
    "norm": (("--norm",), dict(
        type=click.Choice(NORMS), default="batch", show_default=True,
        help="The networks' normalisation layers: batch (BatchNorm, the published networks) "
             "or group (GroupNorm, 32 groups: no batch statistics). At batch size 1 BatchNorm "
             "normalises each image by its own statistics and VGG and Inception stay at "
             "chance (ResNet learns); GroupNorm learns at any batch size.")),
}


def shared_option(name: str, **attrs):
    """The click option ``name`` of :data:`SHARED_OPTIONS`, with ``attrs`` (default, help) added."""
    flags, shared = SHARED_OPTIONS[name]
    return option(*flags, **{**shared, **attrs})


def _duration(seconds) -> str:
    # porder.experiment imports h5py (porder.store): only when a run reports its time.
    from ..experiment.plan import duration

    return duration(seconds)


def _fmt_row(row: dict) -> str:
    parts = [f"test loss {row['test_loss']:.4f} acc {100 * row['test_acc']:.1f}%"]
    if row.get("train_loss") is not None:
        parts.insert(0, f"train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:.1f}%")
        parts.append(f"{row['images_per_s']:.0f} img/s, data wait "
                     f"{100 * row['data_wait']:.1f}%")
    return "  ".join(parts)


class TrainProgress:
    """Training progress: a tqdm bar (loss, accuracy, ETA) on a terminal; plain lines
    otherwise, one per evaluation and one every ``every`` seconds, with the ETA.

    Once the first steps are timed (``first`` seconds after the first step), one
    line says how long the whole run will take: the measured seconds per step
    (evaluations left out) times the steps left, plus the evaluations left at the
    cost of the last one. Rates count only the steps of this process, so a
    resumed run is not credited with the steps it had done before.
    """

    def __init__(self, enabled: bool | None = None, desc: str = "train", *,
                 eval_every: int | None = None, batch_size: int | None = None,
                 every: float = 30.0, first: float = 3.0, slow_hint: str = ""):
        self.tty = sys.stderr.isatty() if enabled is None else enabled
        self.desc = desc
        self.bar = None
        self.post: dict = {}
        self.eval_every, self.batch_size = eval_every, batch_size
        self.every, self.first = every, first
        self.slow_hint = slow_hint  # added to the estimate when the run takes over 10 minutes
        self.initial = None         # the step this process started from
        self.start = None           # (step, time) once its first step is done
        self.eval_time = 0.0        # seconds of evaluations since then
        self.eval_cost = None       # seconds of the last evaluation
        self.last_line = 0.0
        self.told = False

    def eta(self, step: int, total: int, now: float) -> tuple[float, float] | None:
        """(seconds left, seconds per step) once a step has been timed, else None."""
        if self.start is None or step <= self.start[0]:
            return None
        s0, t0 = self.start
        per_step = max(now - t0 - self.eval_time, 1e-9) / (step - s0)
        left = (total - step) * per_step
        if self.eval_every and self.eval_cost is not None:
            e = self.eval_every
            left += (total // e - step // e + (1 if total % e else 0)) * self.eval_cost
        return left, per_step

    def _say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            click.echo(line, err=True)

    def __call__(self, step: int, total: int, stats: dict | None) -> None:
        now = time.perf_counter()
        if self.initial is None:
            self.initial = step
        before = self.start is not None
        if not before and step > self.initial:   # the first step (warm-up) is not timed
            self.start = (step, now)
        if stats is not None and stats.get("eval_s") is not None:
            self.eval_cost = stats["eval_s"]
            if before:
                self.eval_time += stats["eval_s"]
        if before and not self.told and step < total \
                and now - self.start[1] - self.eval_time >= self.first:
            self.told = True
            left, per_step = self.eta(step, total, now)
            whole = now - self.start[1] + left
            rate = f", {self.batch_size / per_step:,.0f} img/s" if self.batch_size else ""
            self._say(f"{self.desc}: {1 / per_step:.2f} steps/s{rate}: the {total} steps will "
                      f"take about {_duration(whole)} in all, {_duration(left)} from now"
                      + (self.slow_hint if whole > 600 else ""))
        self._update(step, total, stats, now)

    def _update(self, step: int, total: int, stats: dict | None, now: float) -> None:
        if self.tty and self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=step, desc=self.desc, unit="step",
                            dynamic_ncols=True, leave=True)
        if self.bar is not None:
            if stats is not None:
                if "test_acc" in stats:
                    self.post["test"] = f"{100 * stats['test_acc']:.1f}%"
                    if stats.get("train_loss") is not None:
                        self.post.update(loss=f"{stats['train_loss']:.3f}",
                                         acc=f"{100 * stats['train_acc']:.1f}%")
                else:
                    self.post.update(loss=f"{stats['loss']:.3f}", acc=f"{100 * stats['acc']:.1f}%")
                self.bar.set_postfix(self.post, refresh=False)
            self.bar.update(step - self.bar.n)
            return
        eta = self.eta(step, total, now)
        left = f"  ETA {_duration(eta[0])}" if eta and step < total else ""
        if stats is not None and "test_acc" in stats:
            self.last_line = now
            click.echo(f"{self.desc}: step {step}/{total}  {_fmt_row(stats)}{left}", err=True)
        elif eta and now - self.last_line >= self.every:
            self.last_line = now
            click.echo(f"{self.desc}: step {step}/{total} ({100 * step / total:.0f}%, "
                       f"{1 / eta[1]:.2f} steps/s){left}", err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@command(epilog="\b\n" + FM_POINTS_HELP)
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@option("-a", "--arch", type=click.Choice(ARCHS), default="vgg", show_default=True,
        help="VGG-16-BN, ResNet-18 or Inception-v3 (CIFAR-sized).")
@shared_option("width", default=1.0, help="Channel multiplier: 1.0 = the published networks, "
               "as in the paper; 0.125-0.25 trains many times faster on a CPU (compare "
               "defaults to 0.25: it trains many runs).")
@shared_option("norm")
@shared_option("lr")
@shared_option("batch_size", help="Images per step; 1 = online training, as in the paper.")
@shared_option("steps", help="Optimizer steps.")
@shared_option("eval_every", default=100, help="Steps between test evaluations and checkpoints.")
@shared_option("eval_images",
               help="Test images of the evaluations before the last step: a fixed seeded "
                    "subset of the test split (the same for any --seed); the last step is "
                    "evaluated on the whole split [default: the whole split every time].")
@option("--seed", type=SEED, default=0, show_default=True,
        help="Seed of the weights, the batch order and dropout.")
@shared_option("device", help="cpu, cuda, or auto: CUDA when torch sees a GPU (`porder info`).")
@option("-o", "--out", "out", type=click.Path(file_okay=False), default=None,
        help="Run folder [default: runs/FILE-ARCH-seedSEED].")
@option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@option("-m", "--measure", "measure", type=MeasureChoice(exclude=("none",)), default=None,
        old_names=("--reorder",),
        help="Reorder every batch on the fly with this measure (FILE must be unmodified, "
             "i.e. made with --measure none).")
@option("-p", "--patch", type=IntRange(min=1), default=8, show_default=True,
        help="Patch side for --measure.")
@shared_option("bins", help="Histogram bins for --measure and --fm-reorder.")
@option("--fm-reorder", "fm_reorder", multiple=True, metavar="POINT:MEASURE:PATCH",
        help="Reorder the patches of the feature maps at POINT of the network "
             "(porder.nn.PatchReorder); repeatable or comma-separated, one per point. "
             "Points per architecture: see below.")
@shared_option("workers")
@shared_option("progress",
               help="Progress bar [default: on a terminal; a line per evaluation otherwise].")
@json_option
def train(file, arch, width, norm, lr, batch_size, steps, eval_every, eval_images, seed, device, out,
          resume, measure, patch, bins, fm_reorder, workers, progress, as_json):
    """Train a CNN with Adam and cross-entropy on a porder HDF5 FILE.

    Evaluates on FILE's test split every --eval-every steps and writes
    metrics.jsonl, curves.png and a checkpoint to the run folder. Ctrl-C keeps
    the last checkpoint: run the same command with --resume to continue, to the
    same result as an uninterrupted run. An existing run folder is refused
    without --resume.

    --fm-reorder inserts the paper's patch ordering inside the network: the
    feature maps leaving POINT are cut into PATCH x PATCH patches and reordered
    per sample by MEASURE, in training and evaluation; it is recorded in
    config.json, and --resume refuses a run made with other layers.

    Under torchrun the processes train one model with DistributedDataParallel
    (gloo on CPU, NCCL on GPUs): --batch-size is the global batch, split evenly
    over the processes; rank 0 writes the run folder and reports progress.

    \b
    Examples:
      porder train c100-mi8.h5 --arch vgg --width 0.25 --steps 2000
      porder train c100-mi8.h5 --arch inception --batch-size 1 --lr 1e-4 --norm group
      porder train baseline.h5 --measure mi --patch 4 -o runs/mi4
      porder train c100-mi8.h5 -o runs/vgg --resume --json
      porder train none.h5 --arch resnet --fm-reorder stem:mi:4,stage2:mi:4
      torchrun --nproc-per-node 4 -m porder train c100-mi8.h5 -b 128 -o runs/ddp
    """
    from ..store import read_meta
    from ..train.checkpoint import resume_note
    from ..train.config import TrainConfig
    from ..train.distributed import dist_env
    from ..train.fm import check_fm_reorder
    from ..train.loop import train as run_training

    with library_errors():
        env = dist_env()
        size = int(read_meta(file)["image_size"]) if fm_reorder else 0
    rank = env.rank
    try:
        fm = [str(sp) for sp in check_fm_reorder(arch, size, split_fm_reorder(fm_reorder))]
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--fm-reorder'") from None
    if out is None:
        tag = "".join(f"-fm-{s.replace(':', '-')}" for s in fm)
        out = str(Path("runs") / f"{Path(file).stem}-{arch}{tag}-seed{seed}")
    cfg = TrainConfig(arch=arch, width=width, lr=lr, batch_size=batch_size, steps=steps,
                      eval_every=eval_every, seed=seed, device=device, reorder=measure,
                      patch=patch, bins=bins, threads=workers, fm_reorder=fm,
                      eval_images=eval_images, norm=norm)
    compile_s = _compile_first(device, [measure] if measure else [], fm) if rank == 0 else None
    # One reporter for a torchrun job: rank 0's; other ranks print only their errors.
    hint = (f" (a smaller --width than {width:g}, e.g. 0.25, is much faster on a CPU)"
            if width > 0.25 else "")
    reporter = TrainProgress(progress, desc=arch, eval_every=eval_every, batch_size=batch_size,
                             slow_hint=hint) if rank == 0 else None
    t0 = time.perf_counter()
    if resume and rank == 0 and (note := resume_note(out)):
        click.echo(note, err=True)
    try:
        with interruptible(f"the last checkpoint is in {out}; run the same command with "
                           f"--resume to continue.", quiet=rank != 0), \
                library_errors(f"rank {rank}: " if rank else ""):
            result = run_training(file, cfg, out, resume=resume, progress=reporter)
    finally:
        if reporter is not None:
            reporter.close()
    if rank != 0:
        return
    final, seconds = result.final, time.perf_counter() - t0
    if as_json:
        emit_json({"out": out, "file": file, "arch": arch, "device": result.device,
                   "world_size": result.world_size, "resumed_from": result.resumed_from,
                   "step": final["step"], "final": final, "seconds": seconds,
                   "compile_seconds": compile_s,
                   "files": {name: str(Path(out) / name) for name in RUN_FILES}})
        return
    procs = f" x {result.world_size} processes" if result.world_size > 1 else ""
    click.echo(f"{arch} on {file} ({result.device}{procs}): step {final['step']}  "
               f"{_fmt_row(final)}  [{seconds:.0f} s]", err=True)
    click.echo(f"Wrote {Path(out) / 'metrics.jsonl'} and {Path(out) / 'curves.png'}", err=True)


# What a run folder holds (porder.train.metrics and porder.train.checkpoint write them).
RUN_FILES = ("checkpoint.pt", "config.json", "metrics.jsonl", "result.json", "curves.png")


def _compile_first(device: str, measures: list, fm: list) -> float | None:
    """The CPU kernels' first compile, said on one line, when a run on the CPU orders
    batches (``--measure``) or feature maps (``--fm-reorder``) by a built-in measure."""
    names = [*measures, *(spec.split(":")[1] for spec in fm)]
    if not names:
        return None
    from ..train.device import resolve_device

    try:
        on_cpu = resolve_device(device) == "cpu"
    except ValueError:  # no GPU for --device cuda: the run itself says so
        return None
    return compile_kernels_first(names, on_cpu=on_cpu)


def split_fm_reorder(values) -> list[str]:
    """Repeated and comma-separated ``--fm-reorder`` values -> one spec string each."""
    return [v for value in values for v in split_items(value)]


def _list_option(kind, name, plural, example, check=None):
    """A click callback: 'a, b,c' -> [kind('a'), ...], duplicates dropped, each checked."""
    def convert(ctx, param, value):
        try:
            parts = split_items(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
        try:
            items = [kind(v) for v in parts]
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of "
                                     f"{plural} (e.g. {example})") from None
        if not items:
            raise click.BadParameter("give at least one value")
        for v in items:
            if check and not check(v):
                raise click.BadParameter(f"{v!r} is not a valid {name}")
        return list(dict.fromkeys(items))
    return convert


@command()
@click.argument("source")
@option("-o", "--out", type=click.Path(file_okay=False), required=True,
        help="Output folder: caches, runs, summary.csv/md and figures (run the same "
             "command again to resume in it).")
@option("--preset", type=click.Choice(["paper", "paper-cpu"]), default=None,
        help="paper: the paper's Fig. 4 experiment: Inception, batch 1, 10,000 steps, every "
             "measure with none and random, patches 4,8,16, 3 seeds, ...; paper-cpu: the same "
             "structure shrunk to finish on a 2-core CPU within the hour (--dry-run prints "
             "every value and its reason). Options given explicitly override it.")
@option("-m", "--measures", default="none,mi", show_default=True, metavar="LIST",
        callback=_list_option(str, "measure", "measures", "none,mi",
                              lambda m: m in MEASURES or m.startswith("fm:")),
        help="Comma-separated measures; `none` (the baseline) is added if missing. "
             "fm:POINT:MEASURE:PATCH trains on the `none` cache with a feature-map reordering "
             "layer at POINT (see `porder train --help`); fm:POINT:MEASURE, at every patch "
             "side of --patches.")
@option("-p", "--patches", "patches", default="8", show_default=True, metavar="LIST",
        old_names=("--patch",),
        callback=_list_option(int, "patch size", "patch sizes", "4,8,16", lambda p: p >= 1),
        help="Comma-separated patch sides, e.g. 4,8,16.")
@option("-a", "--archs", "archs", default="vgg", show_default=True, metavar="LIST",
        old_names=("--arch",),
        callback=_list_option(str, "architecture", "architectures", "vgg,resnet",
                              lambda a: a in ARCHS),
        help=f"Comma-separated architectures from {', '.join(ARCHS)}.")
@option("--seeds", type=IntRange(min=1), default=3, show_default=True,
        help="Seeds per configuration (0..N-1).")
@shared_option("steps", help="Optimizer steps per run.")
@shared_option("width", default=0.25, help="Channel multiplier of every network; 0.25, not "
               "train's 1.0 (the published size), because a comparison trains measures x "
               "patches x seeds runs.")
@shared_option("norm")
@shared_option("lr")
@shared_option("batch_size", help="Images per step (1 = online training).")
@shared_option("eval_every", default=50, help="Steps between test evaluations; 50, not train's "
               "100, because steps-to-target figures are only as fine as this.")
@option("--size", type=IntRange(min=8), default=32, show_default=True,
        help="Images are resized to SIZE x SIZE.")
@shared_option("bins", help="Histogram bins of the measures.")
@option("--test-fraction", type=FiniteFloat(0, 1, max_open=True), default=0.1,
        show_default=True, help="Held-out share for sources without a test split.")
@shared_option("device", help="cpu, cuda, or auto: the networks train on CUDA when torch "
               "sees a GPU, the caches are made on it when CuPy sees one (`porder info`).")
@shared_option("eval_images",
               help="Test images of each curve point: a fixed seeded subset of the test "
                    "split, the same for every run; the last step is evaluated on the whole "
                    "split [default: the whole split every time].")
@option("--lockstep", type=click.Choice(["auto", "on", "off"]), default="auto",
        show_default=True,
        help="Train runs in groups of M models in lockstep, one batched step for all M "
             "(auto: when runs share architecture, width, batch size, steps and device; M "
             "fits the memory: a share of the free RAM, or of the GPU's free memory). off: "
             "one after another. on: as auto, but fail when no group of two fits. Results "
             "and run folders are the same either way.")
@shared_option("workers", help="CPU threads porder uses: the caches' decoding and scoring, "
                                "and torch's threads for training [default: all cores].")
@option("--dry-run", is_flag=True,
        help="Check the source and the runs already in OUT, print the plan (with the "
             "preset's values and the lockstep groups: runs, M, memory) with the estimated "
             "time of each cache to build and each group and run to train on this machine "
             "and their total, and stop (exit 1 on a conflict).")
@shared_option("progress", help="Progress bars [default: on a terminal; plain lines otherwise].")
@json_option
@click.pass_context
def compare(ctx, source, out, preset, measures, patches, archs, seeds, steps, width, norm, lr,
            batch_size, eval_every, size, bins, test_fraction, device, eval_images, lockstep,
            workers, dry_run, progress, as_json):
    """Run the paper's comparison: train on SOURCE reordered by each measure.

    SOURCE is reordered once per (measure, patch) into OUT/data/*.h5; every
    architecture is trained with identical hyperparameters and seeds on each;
    OUT/summary.md and summary.csv compare final and best test accuracy, steps
    to 90%/95% of the `none` baseline, speed-up and area under the accuracy
    curve, with figures like the paper's Fig. 4 and 5. summary.md (and
    paired.csv) also compare every ordering with `none` and with `random`,
    seed by seed: the paired differences of the area and of the steps to 95%,
    95% t intervals and a verdict (faster, slower, no detectable difference).
    Run the same command again to resume an interrupted comparison.

    Runs that share architecture, width, batch size, steps and device train in
    lockstep (--lockstep): M models per batched step, each with its own weights,
    optimizer, batch order, data and run folder.

    \b
    Examples:
      porder compare cifar-100-python.tar.gz -m none,mi,entropy -p 4,8,16 -o cmp
      porder compare dogs-vs-cats/ -m none,mi,random --seeds 3 --width 0.125 -o dvc
      porder compare dogs-vs-cats/ -m none,mi,fm:stem:mi:4 -a resnet -o fm
      porder compare cifar-100-python.tar.gz --preset paper -o paper --dry-run
      porder compare digits --preset paper-cpu -o paper-cpu
      porder compare synthetic:2000:4 -o demo --steps 200 --dry-run --json
    """
    from ..experiment import compare as run_compare

    opts = dict(measures=measures, patches=patches, archs=archs, seeds=seeds, steps=steps,
                width=width, lr=lr, batch_size=batch_size, eval_every=eval_every, size=size,
                bins=bins, test_fraction=test_fraction, eval_images=eval_images, norm=norm)
    given = {k: v for k, v in opts.items() if _given(ctx, k)}
    if preset is not None:
        from ..experiment.preset import preset_values

        opts.update({k: v for k, v in preset_values(preset).items() if k not in given})
    _check_fm_items(opts)
    tty = sys.stderr.isatty() if progress is None else progress
    log = lambda line: click.echo(line, err=True)
    with interruptible("run the same command again to resume."), library_errors():
        compile_s = None if dry_run else _compile_for_caches(device, opts["measures"])
        result = run_compare(
            source, out, **opts, device=device, threads=workers, dry_run=dry_run,
            lockstep=lockstep, log=log, progress_for=lambda desc: TrainProgress(tty, desc=desc,
                                                             eval_every=opts["eval_every"],
                                                             batch_size=opts["batch_size"]),
            cache_progress=CacheProgress(tty))
        if dry_run:
            _report_plan(result, preset, given, out, as_json)
            return
    if as_json:
        emit_json(compare_json(result, out, compile_s))
        return
    click.echo((Path(out) / "summary.md").read_text())


def _compile_for_caches(device: str, measures) -> float | None:
    """The CPU kernels' first compile, said on one line, before a comparison whose caches
    (or feature-map layers) are ordered on the CPU by a built-in measure."""
    from ..backend import resolve_device

    names = [m.split(":")[2] if m.startswith("fm:") else m for m in measures]
    try:
        on_cpu = resolve_device(device) == "cpu"
    except ValueError:  # no GPU for --device cuda: the comparison itself says so
        return None
    return compile_kernels_first(names, on_cpu=on_cpu)


def _report_plan(plan, preset, given, out, as_json: bool) -> None:
    """``compare --dry-run``: the plan as text or JSON; exit 1 when runs on disk conflict."""
    if as_json:
        emit_json(plan_json(plan))
    else:
        if preset is not None:
            from ..experiment.preset import describe_preset

            click.echo(describe_preset(preset, given))
        click.echo(plan.describe())
    if plan.conflicts:
        raise click.ClickException(f"{len(plan.conflicts)} of {len(plan.runs)} runs "
                                   f"in {out} conflict with these options (listed above)")


def plan_json(plan) -> dict:
    """``compare --dry-run --json``: what a comparison would build and train, and what is done."""
    g = plan.grouping
    groups = None if g is None else [
        {"runs": [str(r.dir) for r in grp.runs], "m": grp.m, "lockstep": grp.lockstep,
         "bytes": grp.bytes, "seconds": grp.seconds} for grp in g.groups]
    return {"dry_run": True, "source": plan.source, "out": plan.out, "settings": plan.settings,
            "lockstep": None if g is None else g.mode, "groups": groups,
            "memory_budget": None if g is None else g.budget,
            "caches": [{"measure": c.measure, "patch": c.patch, "path": c.path,
                        "state": c.state, "seconds": c.seconds} for c in plan.caches],
            "runs": [{"arch": r.arch, "measure": r.measure, "patch": r.patch, "seed": r.seed,
                      "dir": r.dir, "state": r.state, "at_step": r.at_step,
                      "reason": r.reason or None, "seconds": r.seconds} for r in plan.runs],
            "conflicts": len(plan.conflicts), "seconds_left": plan.seconds_left}


def compare_json(result, out, compile_s) -> dict:
    """``compare --json``: the summary's rows, the paired verdicts and the files written."""
    return {"dry_run": False, "out": out, "summary": str(Path(out) / "summary.md"),
            "files": result.files, "runs": result.runs, "means": result.means,
            "stds": result.stds, "comparisons": result.comparisons,
            "compile_seconds": compile_s}


def _given(ctx: click.Context, name: str) -> bool:
    """Whether option ``name`` was given explicitly (command line or environment)."""
    from click.core import ParameterSource

    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE,
                                              ParameterSource.ENVIRONMENT)


def _check_fm_items(opts: dict) -> None:
    """``fm:`` measures against every architecture and the image size: exit 2 when bad."""
    items = [m for m in opts["measures"] if m.startswith("fm:")]
    if not items:
        return
    from ..experiment.plan import fm_spec, parse_measure_item
    from ..train.fm import check_fm_reorder

    try:
        for item in items:
            for m, p in parse_measure_item(item, opts["patches"]):
                for arch in opts["archs"]:
                    check_fm_reorder(arch, opts["size"], [fm_spec(m, p)])
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'-m' / '--measures'") from None


class CacheProgress:
    """Cache building: a tqdm bar per split on a terminal, a line per finished split otherwise."""

    def __init__(self, tty: bool):
        self.tty, self.bar, self.split = tty, None, None

    def __call__(self, split: str, done: int, total: int) -> None:
        if self.tty:
            if split != self.split or self.bar is None:
                self.close()
                from tqdm import tqdm

                self.split = split
                self.bar = tqdm(total=total, initial=done, desc=f"  {split}", unit="img",
                                dynamic_ncols=True, leave=False)
            self.bar.update(done - self.bar.n)
        elif done >= total:
            click.echo(f"  {split}: {done}/{total} images", err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
