"""Planning a comparison: the caches to build and the runs to train, and which of them
are already done (a comparison run again resumes where it stopped).

A comparison has *arms*: an input ordering (a measure, at each patch size, on its own
cache) or a feature-map ordering (``fm:POINT:MEASURE:PATCH``: the ``none`` cache, with a
:class:`porder.nn.PatchReorder` layer at POINT of the network; ``fm:POINT:MEASURE`` sweeps
the patch sizes). Every arm is trained with every architecture and seed."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ..measures import get_measure
from ..patches import check_patch_size
from ..sources.base import stored_name
from ..store import partial_path, read_meta


@dataclass
class CacheItem:
    measure: str
    patch: int
    path: Path
    state: str = "build"        # ready | resume | build

    @property
    def label(self) -> str:
        return _label(self.measure, self.patch)


@dataclass
class Arm:
    """One ordering compared: ``measure`` is a measure name or ``fm:POINT:MEASURE``."""

    measure: str
    patch: int
    cache: Path                 # the cache trained on (``none``'s for feature-map arms)

    @property
    def label(self) -> str:
        return _label(self.measure, self.patch)

    @property
    def fm(self) -> list:
        """The ``--fm-reorder`` specs of the arm's runs (empty for an input ordering)."""
        return [fm_spec(self.measure, self.patch)] if is_fm(self.measure) else []


@dataclass
class RunItem:
    arch: str
    measure: str
    patch: int
    seed: int
    cache: Path
    dir: Path
    state: str = "new"          # done | resume | new
    at_step: int = 0

    @property
    def label(self) -> str:
        return _label(self.measure, self.patch)

    @property
    def fm(self) -> list:
        return [fm_spec(self.measure, self.patch)] if is_fm(self.measure) else []


@dataclass
class Plan:
    source: str
    out: Path
    caches: list = field(default_factory=list)
    runs: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    arms: list = field(default_factory=list)

    def describe(self) -> str:
        """The plan as text (``--dry-run``)."""
        s = self.settings
        lines = [f"compare {self.source} -> {self.out}",
                 f"  {len(self.runs)} runs: arch {', '.join(s['archs'])}; "
                 f"measures {', '.join(s['measures'])}; patch {', '.join(map(str, s['patches']))};"
                 f" seeds {', '.join(map(str, s['seeds']))}",
                 f"  each: {s['steps']} steps, batch {s['batch_size']}, Adam lr {s['lr']}, "
                 f"width {s['width']}, eval every {s['eval_every']}, {s['size']}x{s['size']} "
                 f"images, device {s['device']}",
                 "caches:"]
        for c in self.caches:
            lines.append(f"  {c.state:<7} {c.path}")
        lines.append("runs:")
        for r in self.runs:
            st = f"resume (step {r.at_step})" if r.state == "resume" else r.state
            lines.append(f"  {st:<7} {r.arch:<9} {r.label:<12} seed {r.seed}  {r.dir}")
        return "\n".join(lines)


FM_PREFIX = "fm:"


def is_fm(measure: str) -> bool:
    """Whether an arm's ``measure`` is a feature-map ordering (``fm:POINT:MEASURE``)."""
    return str(measure).startswith(FM_PREFIX)


def fm_spec(measure: str, patch: int) -> str:
    """``fm:POINT:MEASURE`` and a patch -> the ``--fm-reorder`` spec ``POINT:MEASURE:PATCH``."""
    return f"{measure[len(FM_PREFIX):]}:{patch}"


def _label(measure: str, patch: int) -> str:
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
                         "fm:POINT:MEASURE for every --patch)") from None
    return [(f"{FM_PREFIX}{sp.point}:{sp.measure}", sp.patch) for sp in parsed]


def parse_list(text: str, kind=str) -> list:
    """'a, b,c' -> ['a', 'b', 'c'] (converted by ``kind``), duplicates dropped."""
    items = []
    for part in str(text).split(","):
        part = part.strip()
        if part:
            v = kind(part)
            if v not in items:
                items.append(v)
    return items


def make_plan(source: str, out, *, measures: Sequence[str] = ("none", "mi"),
              patches: Sequence[int] = (8,), archs: Sequence[str] = ("vgg",),
              seeds=3, steps: int = 1000, width: float = 0.25, lr: float = 1e-3,
              batch_size: int = 32, eval_every: int = 100, size: int = 32, bins: int = 256,
              test_fraction: float = 0.1, device: str = "auto") -> Plan:
    """Which caches to build and which runs to train, and what is already done.

    ``seeds`` is a count (seeds 0..n-1) or a list. ``none`` is added as the
    baseline when missing; it does not depend on the patch size, so it is
    cached and trained once per arch x seed.
    """
    from ..train.config import TrainConfig, identity_diff
    from ..train.fm import check_fm_reorder
    from ..train.metrics import read_metrics, read_result
    from ..train.models import MODELS

    patches = [int(p) for p in patches]
    if not patches:
        raise ValueError("give at least one patch size, e.g. --patch 8")
    for p in patches:
        check_patch_size(size, p)
    items = [str(m).strip() for m in measures if str(m).strip()]
    if not items:
        raise ValueError("give at least one measure, e.g. --measures none,mi")
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
    TrainConfig(arch=archs[0], width=width, lr=lr, batch_size=batch_size, steps=steps,
                eval_every=eval_every, device=device).validate()
    plan = Plan(source=source, out=out, settings=settings)

    inputs = [m for m, p in pairs if not is_fm(m) and m != "none"]
    combos = [("none", patches[0])] + [(m, p) for m in dict.fromkeys(inputs) for p in patches]
    for m, p in combos:
        path = out / "data" / f"{_label(m, p)}.h5"
        state = "build"
        if path.exists():
            _check_cache(path, source=source, measure=m, patch=p, size=size, bins=bins,
                         test_fraction=test_fraction)
            state = "ready"
        elif partial_path(path).exists():
            state = "resume"
        plan.caches.append(CacheItem(m, p, path, state))
    plan.arms = [Arm(c.measure, c.patch, c.path) for c in plan.caches]
    for m, p in dict.fromkeys((m, p) for m, p in pairs if is_fm(m)):
        plan.arms.append(Arm(m, p, plan.caches[0].path))       # the `none` cache

    for arch in archs:
        for seed in seeds:  # seed-major: an interrupted compare has whole seeds done
            for arm in plan.arms:
                d = out / "runs" / arch / arm.label / f"seed{seed}"
                cfg = run_config(settings, arch, seed, arm.fm)
                item = RunItem(arch, arm.measure, arm.patch, seed, arm.cache, d)
                res = read_result(d)
                rows = read_metrics(d)
                if res and res.get("steps") == steps and not identity_diff(res["config"], cfg) \
                        and rows and rows[-1]["step"] == steps:
                    item.state, item.at_step = "done", steps
                elif (d / "checkpoint.pt").exists():
                    item.state = "resume"
                    item.at_step = max((r["step"] for r in rows), default=0)
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
                       threads=threads, **extra)


def _check_cache(path: Path, *, source, measure, patch, size, bins, test_fraction):
    meta = read_meta(path)
    want = {"measure": measure, "image_size": size, "source": stored_name(source), "bins": bins,
            "test_fraction": test_fraction}
    if measure != "none":
        want["patch"] = patch
    diff = [f"{k}: file has {meta.get(k)!r}, now {v!r}" for k, v in want.items()
            if meta.get(k) != v]
    if diff:
        raise ValueError(f"cache '{path}' was made with other options ({'; '.join(diff)}); "
                         "use another output folder or delete it")
