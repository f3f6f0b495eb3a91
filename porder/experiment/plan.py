"""Planning a comparison: the caches to build and the runs to train, which of them are
already done (a comparison run again resumes where it stopped), which runs on disk
conflict with the options; :meth:`Plan.describe` lists it all, with the times that
:mod:`.estimate` gives what is left.

A comparison has *arms*: an input ordering (a measure, at each patch size, on its own
cache) or a feature-map ordering (``fm:POINT:MEASURE:PATCH``: the ``none`` cache, with a
:class:`porder.nn.PatchReorder` layer at POINT of the network; ``fm:POINT:MEASURE`` sweeps
the patch sizes). Every arm is trained with every architecture and seed."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from ..measures import get_measure
from ..patches import check_patch_size
from ..store import partial_path, read_meta
from ..trainspec import split_items

if TYPE_CHECKING:
    from ..pipeline import CacheSpec


@dataclass
class CacheItem:
    measure: str
    patch: int
    path: Path
    state: str = "build"        # ready | resume | build
    seconds: Optional[float] = None   # estimated time to build it on this machine
    spec: Optional[CacheSpec] = None  # how to build it (resuming its .part)

    @property
    def label(self) -> str:
        return arm_label(self.measure, self.patch)


class _Ordering:
    """What an arm and its runs derive from their ``measure`` and ``patch``."""

    measure: str
    patch: int

    @property
    def label(self) -> str:
        return arm_label(self.measure, self.patch)

    @property
    def fm(self) -> list:
        """The ``--fm-reorder`` specs of the arm's runs (empty for an input ordering)."""
        return [fm_spec(self.measure, self.patch)] if is_fm(self.measure) else []


@dataclass
class Arm(_Ordering):
    """One ordering compared: ``measure`` is a measure name or ``fm:POINT:MEASURE``."""

    measure: str
    patch: int
    cache: Path                 # the cache trained on (``none``'s for feature-map arms)


@dataclass
class RunItem(_Ordering):
    arch: str
    measure: str
    patch: int
    seed: int
    cache: Path
    dir: Path
    state: str = "new"          # done | resume | new | conflict
    at_step: int = 0
    reason: str = ""            # why a conflicting run cannot go on
    seconds: Optional[float] = None   # estimated training time left on this device


@dataclass
class Plan:
    source: str
    out: Path
    caches: list = field(default_factory=list)
    runs: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    arms: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)   # train / test images and classes
    # Set by porder.experiment.estimate.estimate_times (with each item's ``seconds``):
    speeds: dict = field(default_factory=dict)   # (arch, fm specs) -> {train, eval img/s, how}
    timings: dict = field(default_factory=dict)  # (arch, fm specs) -> (TrainConfig, StepTiming)
    measured: dict = field(default_factory=dict)  # device, load (average, CPUs), caches (how)
    # Set by porder.experiment.groups.make_groups: how the runs left train (lockstep groups).
    grouping: Optional[object] = None

    @property
    def conflicts(self) -> list:
        """The runs on disk that these options cannot continue."""
        return [r for r in self.runs if r.state == "conflict"]

    @property
    def todo(self) -> list:
        """The caches still to build and the runs still to train, in the order listed."""
        return ([c for c in self.caches if c.state != "ready"]
                + [r for r in self.runs if r.state in ("new", "resume")])

    @property
    def seconds_left(self) -> Optional[float]:
        """The estimated time of the rest of the comparison: the sum of the ``seconds`` of
        :attr:`todo` (None before :func:`porder.experiment.estimate.estimate_times`)."""
        if not self.measured:
            return None
        return sum(item.seconds for item in self.todo)

    def describe(self) -> str:
        """The plan as text (``--dry-run``): what is done, what will fail and why, and,
        once estimated, the expected time of each cache to build and each run to train,
        how those times were found, and their total."""
        s = self.settings
        eta = lambda item: "" if item.seconds is None else f"  ~{duration(item.seconds)}"
        lines = [f"compare {self.source} -> {self.out}",
                 f"  {len(self.runs)} runs: arch {', '.join(s['archs'])}; "
                 f"measures {', '.join(s['measures'])}; patch {', '.join(map(str, s['patches']))};"
                 f" seeds {', '.join(map(str, s['seeds']))}",
                 f"  each: {s['steps']} steps, batch {s['batch_size']}, Adam lr {s['lr']}, "
                 f"width {s['width']}, eval every {s['eval_every']}, {s['size']}x{s['size']} "
                 f"images, device {s['device']}"
                 f"{', GroupNorm' if s.get('norm') == 'group' else ''}",
                 *([f"  curve points on {s['eval_images']} of the {self.counts['test']} test "
                    "images (a fixed subset), the last step on all of them"]
                   if s.get("eval_images") and s["eval_images"] < self.counts.get("test", 0)
                   else []),
                 "caches:"]
        for c in self.caches:
            lines.append(f"  {c.state:<7} {c.path}{eta(c)}")
        lines.append("runs:")
        for r in self.runs:
            st = f"resume (step {r.at_step})" if r.state == "resume" else r.state
            lines.append(f"  {st:<7} {r.arch:<9} {r.label:<12} seed {r.seed}  {r.dir}{eta(r)}")
            if r.state == "conflict":
                lines.append(f"          will fail: {r.reason}")
        if self.conflicts:
            lines.append(f"{len(self.conflicts)} run(s) conflict with the options: use another "
                         "-o, delete their folders, or give the options they were made with")
        elif not self.todo:
            lines.append("nothing left to train")
        else:
            if self.grouping is not None:
                lines += self.grouping.describe()
            if self.measured:
                lines += self._describe_estimate()
        return "\n".join(lines)

    def _describe_estimate(self) -> list:
        """How the times listed were found, and their total (one line)."""
        m, n = self.measured, self.counts
        builds = [c for c in self.caches if c.state != "ready"]
        trains = [r for r in self.runs if r.state in ("new", "resume")]
        lines = [f"how the times were found ({n['train']} train / {n['test']} test images, "
                 f"{n['classes']} classes; training on {m['device']}):"]
        lines += [f"  {sp['how']}" for sp in self.speeds.values()]
        groups = [g for g in (self.grouping.groups if self.grouping else []) if g.lockstep]
        lines += [f"  {how}" for how in dict.fromkeys(g.how for g in groups)]
        if trains:
            k = self.settings.get("eval_images")
            images = (f"({k} test images per curve point, {n['test']} at the last step)"
                      if k and k < n["test"] else f"x {n['test']} test images")
            lines.append(f"  a run: steps left x step time + evaluations left {images} x "
                         "time per image")
        if groups:
            lines.append("  a lockstep group: steps left x its step time + the evaluations "
                         "of its runs; each of its runs is listed with its share (1/M)")
        if builds:
            lines.append(f"  a cache: {m['caches']}")
        parts = [f"{len(items)} {noun}{'' if len(items) == 1 else 's'} {verb} "
                 f"(~{duration(sum(i.seconds for i in items))})"
                 for items, noun, verb in ((builds, "cache", "to build"), (trains, "run", "to train"))
                 if items]
        load = ""
        if m.get("load"):
            load = (f"; measured at a load average of {m['load'][0]:.1f} on {m['load'][1]} "
                    "CPUs: other work slows it down")
        lines.append(f"total: ~{duration(self.seconds_left)} = {' + '.join(parts)} on this "
                     f"machine{load}")
        return lines


FM_PREFIX = "fm:"


def is_fm(measure: str) -> bool:
    """Whether an arm's ``measure`` is a feature-map ordering (``fm:POINT:MEASURE``)."""
    return str(measure).startswith(FM_PREFIX)


def fm_spec(measure: str, patch: int) -> str:
    """``fm:POINT:MEASURE`` and a patch -> the ``--fm-reorder`` spec ``POINT:MEASURE:PATCH``."""
    return f"{measure[len(FM_PREFIX):]}:{patch}"


def duration(seconds: Optional[float]) -> str:
    """'45 s', '12.5 min', '3.2 h'."""
    if seconds is None:
        return "?"
    if seconds < 1:
        return "<1 s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def arm_label(measure: str, patch: int) -> str:
    """File-name-safe label of an arm: ``none``, ``mi-p8``, ``fm-stem-mi-p4``."""
    if measure == "none":
        return "none"
    return f"{measure.replace(':', '-')}-p{patch}"


def parse_measure_item(item: str, patches: Sequence[int]) -> list[tuple[str, Optional[int]]]:
    """One ``--measures`` item -> its arms as (measure, patch) pairs.

    ``mi`` -> [("mi", None)] (input ordering, swept over the patch sizes);
    ``fm:stem:mi:4`` -> [("fm:stem:mi", 4)]; ``fm:stem:mi`` -> one per patch size.
    ValueError for an unknown measure or a malformed ``fm:`` item.
    """
    item = str(item).strip()
    if not is_fm(item):
        return [(get_measure(item).name, None)]
    from ..train.fm import parse_fm_spec

    rest = item[len(FM_PREFIX):]
    specs = [f"{rest}:{p}" for p in patches] if rest.count(":") == 1 else [rest]
    try:
        parsed = [parse_fm_spec(sp) for sp in specs]
    except ValueError as e:
        raise ValueError(f"{e} (in the measure {item!r}: use fm:POINT:MEASURE:PATCH, or "
                         "fm:POINT:MEASURE for every --patches)") from None
    return [(f"{FM_PREFIX}{sp.point}:{sp.measure}", sp.patch) for sp in parsed]


def parse_list(text: str, kind=str, option: str = "") -> list:
    """'a, b,c' -> ['a', 'b', 'c'] (converted by ``kind``), duplicates dropped;
    ValueError for an empty item (:func:`split_items`)."""
    items = []
    for part in split_items(text, option):
        v = kind(part)
        if v not in items:
            items.append(v)
    return items


def make_plan(source: str, out, *, measures: Sequence[str] = ("none", "mi"),
              patches: Sequence[int] = (8,), archs: Sequence[str] = ("vgg",),
              seeds=3, steps: int = 1000, width: float = 0.25, lr: float = 1e-3,
              batch_size: int = 32, eval_every: int = 50, size: int = 32, bins: int = 256,
              test_fraction: float = 0.1, device: str = "auto",
              eval_images: Optional[int] = None, norm: str = "batch") -> Plan:
    """Which caches to build and which runs to train, and what is already done.

    ``seeds`` is a count (seeds 0..n-1) or a list. ``none`` is added as the
    baseline when missing; it does not depend on the patch size, so it is
    cached and trained once per arch x seed. ``eval_images``: test images of each
    curve point (a fixed subset, ``TrainConfig.eval_images``; None: all of them).
    ``norm``: the networks' normalisation (``TrainConfig.norm``).
    """
    from ..pipeline import CacheSpec
    from ..train.config import TrainConfig
    from ..train.fm import check_fm_reorder
    from ..train.models import MODELS

    patches = [int(p) for p in patches]
    if not patches:
        raise ValueError("give at least one patch size, e.g. --patches 8")
    for p in patches:
        check_patch_size(size, p)
    items = [str(m).strip() for m in measures]
    if not items:
        raise ValueError("give at least one measure, e.g. --measures none,mi")
    if "" in items:
        raise ValueError(f"measures {list(measures)!r} has an empty item (item "
                         f"{items.index('') + 1} of {len(items)}); remove it")
    pairs = [pair for m in items for pair in parse_measure_item(m, patches)]
    measures = []                # the settings' list: measure names and fm: items
    for m in items:
        name = m if is_fm(m) else get_measure(m).name
        if name not in measures:
            measures.append(name)
    if "none" not in measures:
        measures = ["none"] + measures
    archs = list(archs)
    for a in archs:
        if a not in MODELS:
            raise ValueError(f"unknown architecture {a!r}; choose from {', '.join(MODELS)}")
    for m, p in pairs:
        if is_fm(m):
            for a in archs:
                check_fm_reorder(a, size, [fm_spec(m, p)])
    seeds = list(range(int(seeds))) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seeds or min(seeds) < 0:
        raise ValueError(f"need at least one non-negative seed, got {seeds}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output '{out}' is a file; give a folder with -o")
    settings = dict(source=source, archs=archs, measures=measures, patches=patches, seeds=seeds,
                    steps=steps, width=width, lr=lr, batch_size=batch_size,
                    eval_every=eval_every, size=size, bins=bins, test_fraction=test_fraction,
                    device=device)
    if eval_images is not None:        # absent when unset: compare.json as before
        settings["eval_images"] = eval_images
    if norm != "batch":                # likewise
        settings["norm"] = norm
    TrainConfig(arch=archs[0], width=width, lr=lr, batch_size=batch_size, steps=steps,
                eval_every=eval_every, device=device, eval_images=eval_images,
                norm=norm).validate()
    plan = Plan(source=source, out=out, settings=settings)
    from ..train.device import resolve_device

    train_device = resolve_device(device)

    inputs = [m for m, p in pairs if not is_fm(m) and m != "none"]
    combos = [("none", patches[0])] + [(m, p) for m in dict.fromkeys(inputs) for p in patches]
    cache_device = "auto" if device in ("auto", "cuda") else "cpu"
    for m, p in combos:
        path = out / "data" / f"{arm_label(m, p)}.h5"
        spec = CacheSpec(source, path, measure=m, patch=p, bins=bins, size=size,
                         test_fraction=test_fraction, seed=0, device=cache_device, resume=True)
        state = "build"
        if path.exists():
            _check_cache(spec)
            state = "ready"
        elif partial_path(path).exists():
            state = "resume"
        plan.caches.append(CacheItem(m, p, path, state, spec=spec))
    plan.arms = [Arm(c.measure, c.patch, c.path) for c in plan.caches]
    for m, p in dict.fromkeys((m, p) for m, p in pairs if is_fm(m)):
        plan.arms.append(Arm(m, p, plan.caches[0].path))       # the `none` cache

    # The source is opened (and so checked) whenever a cache still has to be made from it.
    if all(c.state == "ready" for c in plan.caches):
        meta = read_meta(plan.caches[0].path)
        plan.counts = {"train": meta["splits"].get("train", 0),
                       "test": meta["splits"].get("test", 0), "classes": len(meta["classes"])}
    else:
        plan.counts = _source_counts(source, size=size, test_fraction=test_fraction)
    if plan.counts["test"] < 1:
        raise ValueError(f"source '{source}' gives no test images at --test-fraction "
                         f"{test_fraction} ({plan.counts['train']} images in all); raise it")
    if plan.counts["train"] < batch_size:
        raise ValueError(f"--batch-size {batch_size} is larger than the training split of "
                         f"'{source}' ({plan.counts['train']} images); use at most "
                         f"{plan.counts['train']}")

    identity = {c.path: _cache_identity(c.path) if c.state == "ready" else None
                for c in plan.caches}
    for arch in archs:
        for seed in seeds:  # seed-major: an interrupted compare has whole seeds done
            for arm in plan.arms:
                d = out / "runs" / arch / arm.label / f"seed{seed}"
                cfg = run_config(settings, arch, seed, arm.fm)
                item = RunItem(arch, arm.measure, arm.patch, seed, arm.cache, d)
                _run_state(item, cfg, identity[arm.cache], train_device)
                plan.runs.append(item)
    return plan


def run_config(settings: dict, arch: str, seed: int, fm: Sequence[str] = (),
               threads: Optional[int] = None):
    """The ``TrainConfig`` of one run of a comparison with ``settings`` (:attr:`Plan.settings`).

    Feature-map arms (``fm``) get the comparison's ``bins`` for their layers; input
    arms keep the default, as their training does not use it.
    """
    from ..train.config import TrainConfig

    extra = {"bins": settings["bins"], "fm_reorder": list(fm)} if fm else {}
    return TrainConfig(arch=arch, width=settings["width"], lr=settings["lr"],
                       batch_size=settings["batch_size"], steps=settings["steps"],
                       eval_every=settings["eval_every"], seed=seed, device=settings["device"],
                       threads=threads, eval_images=settings.get("eval_images"),
                       norm=settings.get("norm", "batch"), **extra)


def _source_counts(source: str, *, size: int, test_fraction: float) -> dict:
    """Train / test images and classes of ``source`` as compare caches it (opened, not read)."""
    from ..sources import open_source

    with open_source(source, size=size, test_fraction=test_fraction, seed=0) as src:
        return {"train": src.count("train"), "test": src.count("test"),
                "classes": len(src.classes)}


def _cache_identity(path: Path) -> dict:
    """What a run's ``config.json`` records of the file it trains on (JSON round trip)."""
    from ..train.checkpoint import file_identity

    return json.loads(json.dumps(file_identity(read_meta(path)), default=str))


def _run_state(item: RunItem, cfg, cache_identity: Optional[dict], device: str) -> None:
    """Set ``item.state``/``at_step``/``reason`` from the run folder on disk.

    done: finished with these options. resume: a checkpoint that ``train`` will
    continue. conflict: a run that ``train`` would refuse (other options, another
    file, or past ``--steps``), with the reason. new: nothing there yet.
    """
    from ..train.checkpoint import is_file_state, state_changes
    from ..train.config import config_diff
    from ..train.metrics import CONFIG, read_metrics, read_result

    d, steps = item.dir, cfg.steps
    res, rows = read_result(d), read_metrics(d)
    has_ckpt = (d / "checkpoint.pt").exists()
    if res is None and not has_ckpt:
        return                                               # new
    try:
        recorded = json.loads((d / CONFIG).read_text())
    except (OSError, ValueError):
        recorded = {}
    if not isinstance(recorded, dict):                       # an edited config.json
        recorded = {}
    options = (res or {}).get("config") or recorded.get("config")
    run_device = (res or {}).get("device") or recorded.get("device") or device
    at = int(res["steps"]) if res else max((int(r["step"]) for r in rows), default=0)
    why = []
    if options is not None:
        diff = config_diff(options, cfg, run_device)
        if diff:
            why.append(f"options differ ({', '.join(diff)})")
    if at > steps:
        why.append(f"it is at step {at}, beyond --steps {steps}")
    done = res is not None and at == steps and bool(rows) and rows[-1]["step"] == steps
    if not why and not done and has_ckpt:
        if cache_identity is None:
            why.append("its cache is to be made again, and it was trained on the old one")
        elif recorded.get("file_meta") not in (None, cache_identity):
            why.append("it was trained on another version of its cache")
        elif is_file_state(recorded.get("file_state")):
            _, what = state_changes(recorded["file_state"], item.cache)
            if what:
                why.append(f"its cache '{item.cache}' changed since the run started ({what})")
    if why:
        item.state, item.at_step, item.reason = "conflict", at, "; ".join(why)
    elif done:
        item.state, item.at_step = "done", steps
    elif has_ckpt:
        item.state, item.at_step = "resume", at


def _check_cache(spec: CacheSpec) -> None:
    """ValueError when the cache ``spec.out`` on disk was made with options other than ``spec``'s."""
    path, meta, stored = spec.out, read_meta(spec.out), spec.stored_options()
    keys = ("measure", "image_size", "source", "bins", "test_fraction")
    want = {k: stored[k] for k in keys + (("patch",) if stored["measure"] != "none" else ())}
    diff = [f"{k}: file has {meta.get(k)!r}, now {v!r}" for k, v in want.items()
            if meta.get(k) != v]
    if diff:
        raise ValueError(f"cache '{path}' was made with other options ({'; '.join(diff)}); "
                         "use another output folder or delete it")
