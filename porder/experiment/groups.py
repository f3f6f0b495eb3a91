"""Lockstep groups of a comparison (``compare --lockstep``): which runs train together.

The runs of a comparison differ only in their data and seed, so runs whose
:func:`porder.train.lockstep.lockstep_key` is equal (same architecture, width,
batch size, steps and device) can train *in lockstep*: M models advance together,
each step one batched computation (:func:`porder.train.lockstep.train_group`),
each model with its own parameters, optimizer, batch order and data, and its own
run folder laid out as ``porder train`` lays it out.

:func:`make_groups` splits the runs still to train into groups of at most M:

* M fits the memory budget (:func:`porder.train.memory.memory_budget`: a share of
  the free RAM, or of the GPU's free memory): the largest M whose
  :func:`~porder.train.lockstep.group_bytes` plus M copies of the data is within it;
* M is at most :data:`MAX_GROUP` for the device (see there why);
* the runs of a key are cut into equal groups in the plan's (seed-major) order, so
  an interrupted comparison forms the same groups again when it resumes.

``lockstep``: ``off`` trains every run alone, one after another (as before
lockstep existed); ``auto`` (the default) trains runs that share a key in groups
and a run with no partner (or whose group would not fit twice in the budget) alone;
``on`` is ``auto`` that refuses, rather than falls back, when the memory allows no
group of two.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..output import human_bytes
from .plan import Plan, duration, run_config

LOCKSTEP_MODES = ("auto", "on", "off")

# Most models in one group, per device, and why:
# cpu: 32, because the CPU cost of a lockstep step per model stops falling there: VGG
#   width 0.125, batch 1, 32x32, 1 thread (process time, best of 4): 4.5 ms alone, and
#   per model 2.00 ms at M = 8, 1.81 at 16, 1.48 at 21, 1.46 at 28, 1.42 at 42; larger
#   groups would only delay a comparison's first finished runs and lose more to an
#   interruption (84 runs of the paper presets: 3 groups of 28).
# cuda: 128, because a GPU keeps gaining from larger batched steps far longer (the
#   paper preset's 84 runs of one architecture fit one group); memory is the real limit.
MAX_GROUP = {"cpu": 32, "cuda": 128}


@dataclass
class Group:
    """Runs trained together (one of them alone when ``lockstep`` is False)."""

    runs: list                          # RunItems (new or to resume), in plan order
    lockstep: bool                      # trained with train_group (else train, alone)
    bytes: Optional[int] = None         # memory estimate of the group (models + data)
    seconds: Optional[float] = None     # estimated time to train it (estimate.estimate_times)
    how: str = ""                       # how its step time was found

    @property
    def m(self) -> int:
        return len(self.runs)


@dataclass
class Grouping:
    """The groups of a plan and why they are what they are."""

    mode: str                                   # auto | on | off
    groups: list = field(default_factory=list)  # Group, in training order
    budget: Optional[int] = None                # bytes a group may use
    budget_how: str = ""
    max_group: Optional[int] = None
    notes: list = field(default_factory=list)   # one line per decision worth saying

    def describe(self) -> list:
        """The groups as text lines (``--dry-run``): :func:`describe_groups`."""
        return describe_groups(self)


def check_lockstep(mode: str) -> str:
    if mode not in LOCKSTEP_MODES:
        raise ValueError(f"lockstep={mode!r} is not one of {', '.join(LOCKSTEP_MODES)}")
    return mode


def data_bytes(plan: Plan) -> int:
    """Bytes of one run's data on its device: every image of its cache as uint8."""
    n = plan.counts["train"] + plan.counts["test"]
    return n * plan.settings["size"] ** 2 * 3


def make_groups(plan: Plan, lockstep: str = "auto", *, threads: Optional[int] = None,
                budget: Optional[tuple] = None, max_group: Optional[int] = None) -> Grouping:
    """Split the runs of ``plan`` still to train into the groups they train in.

    Parameters
    ----------
    plan : Plan
    lockstep : {'auto', 'on', 'off'}
    threads : int, optional
        As the comparison will use (recorded in each run's TrainConfig).
    budget : (int, str), optional
        Bytes a group may use and how they were found (default:
        :func:`porder.train.memory.memory_budget` of the device).
    max_group : int, optional
        Most models in one group (default: :data:`MAX_GROUP` of the device).

    Returns
    -------
    Grouping
        Also set as ``plan.grouping``.

    Raises
    ------
    ValueError
        An unknown mode, or ``on`` when a group of two would not fit the budget.
    """
    from ..train.device import resolve_device

    check_lockstep(lockstep)
    todo = [r for r in plan.runs if r.state in ("new", "resume")]
    g = Grouping(lockstep)
    plan.grouping = g
    if lockstep == "off":
        g.groups = [Group([r], False) for r in todo]
        return g
    from ..train.lockstep import group_bytes, lockstep_key

    s, device = plan.settings, resolve_device(plan.settings["device"])
    g.max_group = max_group or MAX_GROUP.get(device, MAX_GROUP["cpu"])
    if budget is None:
        from ..train.memory import memory_budget

        budget = memory_budget(device)
    g.budget, g.budget_how = budget
    by_key: dict = {}
    for r in todo:
        cfg = run_config(s, r.arch, r.seed, r.fm, threads=threads)
        by_key.setdefault(lockstep_key(cfg, device), (cfg, []))[1].append(r)
    per_data = data_bytes(plan)
    size_of = lambda cfg, m: group_bytes(cfg, m, size=s["size"],
                                         num_classes=plan.counts["classes"]) + m * per_data
    first = {}                                     # group -> index of its first run in todo
    for cfg, runs in by_key.values():
        m = _largest_m(lambda k: size_of(cfg, k), min(len(runs), g.max_group), g.budget)
        if len(runs) > 1 and m < 2:
            need = size_of(cfg, 2)
            if lockstep == "on":
                raise ValueError(f"--lockstep on: a group of two {cfg.arch} models needs about "
                                 f"{human_bytes(need)}, more than the budget of {human_bytes(g.budget)} "
                                 f"({g.budget_how}); use --lockstep auto or off, or a smaller "
                                 f"--width or --batch-size")
            g.notes.append(f"{cfg.arch}: a group of two needs about {human_bytes(need)}, more than "
                           f"the budget: its runs train one after another")
        if m < 2 and lockstep == "auto":
            groups = [Group([r], False, size_of(cfg, 1)) for r in runs]
        else:
            n = -(-len(runs) // max(m, 1))         # groups, as equal as they can be
            q, extra = divmod(len(runs), n)        # the first `extra` take one more
            cut = [i * q + min(i, extra) for i in range(n + 1)]
            groups = [Group(runs[a:b], True) for a, b in zip(cut, cut[1:])]
            for grp in groups:
                grp.bytes = size_of(cfg, grp.m)
        for grp in groups:
            first[id(grp)] = todo.index(grp.runs[0])
        g.groups += groups
    g.groups.sort(key=lambda grp: first[id(grp)])
    return g


def _largest_m(size_of, most: int, budget: int) -> int:
    """The largest m in 1..``most`` with ``size_of(m) <= budget`` (1 when none fits)."""
    lo, hi = 1, max(most, 1)
    if size_of(hi) <= budget:
        return hi
    while hi - lo > 1:                   # size_of(lo) fits or lo == 1; size_of(hi) does not
        mid = (lo + hi) // 2
        if size_of(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def describe_groups(g: Grouping) -> list:
    """The groups as text lines (``--dry-run``)."""
    if g.mode == "off":
        return ["lockstep: off (every run trains alone, one after another)"]
    together = [grp for grp in g.groups if grp.lockstep]
    lines = [f"lockstep: {g.mode}; {len(together)} group{'s' if len(together) != 1 else ''} "
             f"of models trained together, at most {g.max_group} per group, each within "
             f"{human_bytes(g.budget)} ({g.budget_how}):"]
    for i, grp in enumerate(g.groups, 1):
        r0 = grp.runs[0]
        what = (f"M={grp.m} in lockstep" if grp.lockstep else "alone")
        eta = "" if grp.seconds is None else f", est. {duration(grp.seconds)}"
        lines.append(f"  group {i}: {r0.arch} {what}, memory est. {human_bytes(grp.bytes)}{eta}: "
                     + ", ".join(f"{r.label}/s{r.seed}" for r in grp.runs))
    lines += [f"  {n}" for n in g.notes]
    return lines
