"""Lockstep training: M runs that share their options advance together, one batched
computation per step over M models.

The runs of a comparison differ only in their data (cache, ``--fm-reorder``
layer) and seed, so :func:`train_group` trains them as one stacked network:
each model keeps its own parameters, Adam state, batch order (its seed), data,
feature-map reordering layers, BatchNorm statistics and dropout stream, and each
run folder gets exactly what :func:`porder.train.train` writes (config.json,
metrics.jsonl, checkpoint.pt in the same format, result.json, curves.png), so a
run started in lockstep resumes alone and the other way round.

Mechanism: models stacked along channels. Activations are (B, M*C, H, W), model m's
channels in block m; a convolution is one grouped convolution (groups = M) over the
stacked weights (M, Cout, Cin, k, k); BatchNorm is per channel, so one
``F.batch_norm`` over the M*C channels with the stacked running statistics is M
BatchNorms exactly (each model's statistics over its own batch); GroupNorm (``--norm
group``) is one ``F.group_norm`` with M times the groups (each model's groups lie
within its channel block); pooling and ReLU act per channel; concatenations
(Inception's branches) concatenate per model; the classifier is one ``bmm``.
Parameters are leaves (M, ...) and one Adam over them is M Adams elementwise (same
step count, same bias correction). Dropout masks are drawn per model from its own
generator, in the order and shape torch's CPU dropout draws them alone, so on the
CPU each model's masks are those of its run trained alone; a ``--fm-reorder`` layer
is applied to its model's channel block.

Why not ``torch.func`` (``stack_module_state`` + ``functional_call`` + ``vmap``):
vmap's convolution rule builds the same grouped convolution, with a batching
layer's dispatch on every op; and the fm-reorder layers (NumPy/numba inside)
and per-run dropout streams cannot run under vmap without custom rules.
Measured (VGG width 0.125, 32x32, M = 16, forward + backward, 1 thread,
process time, best of 3, this 2-core machine under load): batch 1: one after
another 50.5 ms, vmap 37.9 ms, stacked 32.6 ms; batch 32: 391 ms, 442 ms,
321 ms. Unfold + bmm instead of grouped convolutions: 1.1-4.6x slower per layer
except on 4x4 maps. Channels-last maps: slower at batch 1, faster from batch 16
(:data:`CHANNELS_LAST_BATCH`).

Speed (``benchmarks/bench_lockstep.py --quick``, VGG width 0.125, 32x32, 16 runs,
quiet 2-core machine, docs/performance.md): 2 threads, wall clock: batch 1, 245
images/s one after another, 768 in lockstep (3.14x; M = 1, 2, 4, 8, 16: 0.86,
1.11, 1.70, 2.48, 3.14); batch 32, 1,746 and 3,045 (1.74x). 1 thread, process
time: 2.42x and 1.40x. What bounds it on a CPU: a batch-1 run alone is not
overhead-bound (its convolutions are ~60% of its step); the group's convolutions
as GEMMs at MKL's batched rate plus its Adam step would allow 12.1x (2 threads),
and the rest of the step as torch runs it (BatchNorm, ReLU, pooling, autograd:
3.7 of 17.5 ms) brings that to 7.2x even with such convolutions; oneDNN's grouped
convolutions (8-64 channels a group) run these shapes at about a quarter of the
GEMM rate.

Equivalence: on the CPU in float64, the runs of a group have the per-step
losses of the same runs trained alone to ~1e-12 relative
(``tests/train/test_lockstep.py``: all three networks, with and without
``--fm-reorder``). Grouped and single convolutions sum in other orders, so
float32 agrees to rounding, not bit for bit. On CUDA each model's dropout masks
come from its own CUDA generator (seeded as alone) but not through torch's
fused dropout kernel, so they differ from the masks of the run alone.

Groups: runs at different steps (an interrupted group) are brought to a common
step: the runs furthest behind advance together until they reach the next
run's step, where they join it (runs checkpoint at the same steps, so they meet
at checkpoints). A run whose loss goes non-finite is stopped at its next row as
``train`` stops it (last good checkpoint kept, :class:`TrainingDiverged` in the
returned list) and the others go on without it.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..data import epoch_order
from .batches import Prefetch, background_batches, get_batch
from .checkpoint import rng_state, set_rng_state
from .config import TrainConfig, TrainResult, eval_indices
from .device import autocast, resolve_device, sync, torch_settings
from .distributed import dist_env
from .fm import run_adam
from .loop import (
    UNTRAINED,
    Run,
    evaluate,
    interval_stats,
    load_data,
    loss_input,
    memory_hint,
    open_run,
    remove_unstarted_run,
    step_loss_field,
)
from .models import VGG, BasicBlock, Inception, ResNet, build_model

# Options that must be equal for runs to share a group (seed, cache, reorder, patch,
# bins, order_seed and fm_reorder may differ: they act on each model's own data).
KEY_FIELDS = ("arch", "width", "norm", "batch_size", "steps", "eval_every", "lr", "amp",
              "deterministic", "threads", "eval_batch", "eval_images")


def lockstep_key(cfg: TrainConfig, device: str) -> tuple:
    """Runs with equal keys may train in one group (the image size and class count of
    their files must match too: :func:`train_group` splits a group where they do not)."""
    return tuple(getattr(cfg, k) for k in KEY_FIELDS) + (device,)


# --------------------------------------------------------------------------- the stacked network
# From this many images per model, CPU grouped convolutions run faster on channels-last maps
# (VGG width 0.125, 32x32, M = 16, 1 thread: batch 1: NCHW 25.6 ms, channels-last 34.4 ms
# a step; batch 32: 389 ms and 330 ms).
CHANNELS_LAST_BATCH = 16

class StackedNet:
    """M models of one architecture as one network over channel-stacked activations.

    ``params``/``buffers``: name -> (M, ...) tensors (the parameters are leaves the
    group's Adam steps); ``base`` is model 0, read for the structure only.
    :meth:`forward` takes (B, M*3, S, S) and returns logits (M, B, classes).
    """

    def __init__(self, models: Sequence[nn.Module], generators: Sequence[torch.Generator]):
        self.m = len(models)
        self.base = models[0]
        params = [dict(mm.named_parameters()) for mm in models]
        buffers = [dict(mm.named_buffers()) for mm in models]
        with torch.no_grad():
            self.params = {n: torch.stack([p[n].detach() for p in params]).requires_grad_()
                           for n in params[0]}
            self.buffers = {n: torch.stack([b[n] for b in buffers]) for n in buffers[0]}
        self.generators = list(generators)
        # fm-reorder layers: submodule path -> each model's layer there (or None)
        self.fm: dict[str, list] = {}
        for i, mm in enumerate(models):
            for point, layer in getattr(mm, "fm_reorder", {}).items():
                path = mm.fm_points[point][0]
                self.fm.setdefault(path, [None] * self.m)[i] = layer
        self.training = True

    def copy_to(self, models: Sequence[nn.Module]) -> None:
        """Write each model's slice of the stacked states into ``models``."""
        with torch.no_grad():
            for i, mm in enumerate(models):
                for n, p in mm.named_parameters():
                    p.copy_(self.params[n][i])
                for n, b in mm.named_buffers():
                    b.copy_(self.buffers[n][i])

    # ---- the forward pass: one handler per module type of porder.train.models
    def forward(self, x: torch.Tensor, training: bool,
                channels_last: Optional[bool] = None) -> torch.Tensor:
        """Logits (M, B, classes) of inputs (B, M*3, S, S).

        ``channels_last`` (default: on CUDA, and on the CPU from batch
        :data:`CHANNELS_LAST_BATCH`): the maps' memory layout, the faster one
        for grouped convolutions there (see the module docstring).
        """
        self.training = training
        base = self.base
        if channels_last is None:
            channels_last = x.is_cuda or x.shape[0] >= CHANNELS_LAST_BATCH
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if isinstance(base, VGG):
            h = self._walk(base.features, "features", x)
        elif isinstance(base, ResNet):
            h = self._walk(base.layers, "layers", self._walk(base.stem, "stem", x))
        elif isinstance(base, Inception):
            h = self._walk(base.blocks, "blocks", self._walk(base.stem, "stem", x))
        else:
            raise TypeError(f"lockstep training cannot stack a {type(base).__name__}")
        h = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)            # (B, M*C)
        if isinstance(base, Inception):
            h = self._dropout(h, base.drop.p)
        if training:
            for n, b in self.buffers.items():
                if n.endswith("num_batches_tracked"):
                    b.add_(1)
        return self._linear(base.fc, "fc", h)

    def _walk(self, mod: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
        out = self._module(mod, name, x)
        if name in self.fm:
            out = self._fm(self.fm[name], out)
        return out

    def _module(self, mod, name, x):
        sub = lambda child, h: self._walk(mod.get_submodule(child), f"{name}.{child}", h)  # noqa: E731
        if isinstance(mod, nn.Sequential):
            for child in mod._modules:
                x = sub(child, x)
            return x
        if isinstance(mod, nn.Conv2d):
            w = self.params[name + ".weight"]                          # (M, Cout, Cin/g, kh, kw)
            b = self.params.get(name + ".bias")
            return F.conv2d(x, w.reshape(-1, *w.shape[2:]), None if b is None else b.reshape(-1),
                            mod.stride, mod.padding, mod.dilation, mod.groups * self.m)
        if isinstance(mod, nn.BatchNorm2d):
            return F.batch_norm(x, self.buffers[name + ".running_mean"].view(-1),
                                self.buffers[name + ".running_var"].view(-1),
                                self.params[name + ".weight"].view(-1),
                                self.params[name + ".bias"].view(-1),
                                self.training, mod.momentum, mod.eps)
        if isinstance(mod, nn.GroupNorm):     # groups never straddle two models' blocks
            return F.group_norm(x, mod.num_groups * self.m, self.params[name + ".weight"].view(-1),
                                self.params[name + ".bias"].view(-1), mod.eps)
        if isinstance(mod, nn.ReLU):
            return F.relu(x, inplace=mod.inplace)
        if isinstance(mod, nn.MaxPool2d):
            return F.max_pool2d(x, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                                ceil_mode=mod.ceil_mode)
        if isinstance(mod, nn.AvgPool2d):
            return F.avg_pool2d(x, mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode,
                                mod.count_include_pad, mod.divisor_override)
        if isinstance(mod, nn.Identity):
            return x
        kids = set(mod._modules)
        if kids == {"branches"}:               # models._Cat: branches concatenated
            return self._cat([sub(f"branches.{i}", x) for i in range(len(mod.branches))])
        if kids == {"head", "a", "b"}:         # models._Split: a head, then two branches
            h = sub("head", x)
            return self._cat([sub("a", h), sub("b", h)])
        if isinstance(mod, BasicBlock):
            return F.relu(sub("bn2", sub("conv2", sub("conv1", x))) + sub("short", x))
        raise TypeError(f"lockstep training cannot stack a {type(mod).__name__} ({name})")

    def _cat(self, parts):
        """Concatenate (B, M*C_i, H, W) maps model by model: (B, M*sum C_i, H, W)."""
        b, _, h, w = parts[0].shape
        return torch.cat([p.view(b, self.m, -1, h, w) for p in parts], 2).view(b, -1, h, w)

    def _fm(self, layers, x):
        """Each model's feature-map reordering layer on its channel block."""
        b, _, h, w = x.shape
        blocks = x.view(b, self.m, -1, h, w)
        outs = []
        for i, layer in enumerate(layers):
            if layer is None:
                outs.append(blocks[:, i])
            else:
                layer.train(self.training)
                outs.append(layer(blocks[:, i]))
        return torch.stack(outs, 1).view(b, -1, h, w)

    def _dropout(self, x, p: float):
        """Dropout with each model's mask from its own generator, drawn as torch's CPU
        dropout draws it for that model alone: ``bernoulli_(1 - p)`` of its (B, C)."""
        if not self.training or p == 0:
            return x
        b = x.shape[0]
        blocks = x.view(b, self.m, -1)                                 # (B, M, C)
        noise = torch.stack([torch.empty_like(blocks[:, i]).bernoulli_(1 - p, generator=g)
                             for i, g in enumerate(self.generators)], 1)
        noise.div_(1 - p)
        return (blocks * noise).view(b, -1)

    def _linear(self, mod, name, x):
        """(B, M*Cin) -> (M, B, out): one bmm over the stacked weights (M, out, Cin)."""
        w, bias = self.params[name + ".weight"], self.params.get(name + ".bias")
        h = x.view(x.shape[0], self.m, -1).transpose(0, 1)            # (M, B, Cin)
        if bias is None:
            return torch.bmm(h, w.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), h, w.transpose(1, 2))


def group_adam(net: StackedNet, lr: float) -> torch.optim.Optimizer:
    """The group's optimizer: a run's own (:func:`.fm.run_adam`) over the stacked
    parameters, so M Adams elementwise."""
    return run_adam(list(net.params.values()), lr)


def _stack_optimizer(net: StackedNet, opts: Sequence[torch.optim.Optimizer],
                     models: Sequence[nn.Module], lr: float) -> torch.optim.Optimizer:
    """:func:`group_adam`, with the runs' Adam states stacked."""
    opt = group_adam(net, lr)
    params = [dict(mm.named_parameters()) for mm in models]
    for n in net.params:
        states = [o.state.get(p[n]) for o, p in zip(opts, params)]
        if all(not s for s in states):
            continue
        if any(not s for s in states):
            raise ValueError("lockstep runs at one step must all have an optimizer state")
        opt.state[net.params[n]] = {
            "step": states[0]["step"].clone(),
            "exp_avg": torch.stack([s["exp_avg"] for s in states]),
            "exp_avg_sq": torch.stack([s["exp_avg_sq"] for s in states])}
    return opt


def _unstack_optimizer(net: StackedNet, opt, opts, models) -> None:
    """Write each run's slice of the group's Adam state into its own optimizer."""
    params = [dict(mm.named_parameters()) for mm in models]
    for n in net.params:
        st = opt.state.get(net.params[n])
        if not st:
            continue
        for i, o in enumerate(opts):
            o.state[params[i][n]] = {"step": st["step"].clone(),
                                     "exp_avg": st["exp_avg"][i].clone(),
                                     "exp_avg_sq": st["exp_avg_sq"][i].clone()}


# --------------------------------------------------------------------------- memory
def group_bytes(cfg: TrainConfig, m: int, *, size: int, num_classes: int) -> int:
    """Estimated device memory (bytes) of a group of ``m`` runs training, data excluded.

    Parameters, gradients and Adam's two moments (4 copies), the activations a
    training step keeps for its backward pass (each module's output, twice: with
    their gradients) for ``m * batch_size`` images, and an evaluation pass of
    ``eval_batch`` images (its largest map, three times). Float32 (4 bytes), or
    the default dtype's size. Counted on a model built on the meta device.
    """
    n_params, acts, largest = _model_counts(cfg.arch, cfg.width, size, num_classes, cfg.norm)
    item = torch.empty((), dtype=torch.get_default_dtype()).element_size()
    train = 4 * n_params * m + 2 * acts * cfg.batch_size * m
    evaluation = 3 * largest * max(cfg.eval_batch, m)
    return int(item * (train + evaluation))


@functools.lru_cache(maxsize=32)
def _model_counts(arch: str, width: float, size: int, num_classes: int,
                  norm: str = "batch") -> tuple[int, int, int]:
    """(parameters, activation values per image summed over modules, largest map per image)."""
    with torch.device("meta"):
        model = build_model(arch, num_classes=num_classes, in_size=size, width=width, norm=norm)
        sizes = []
        hooks = [mod.register_forward_hook(lambda _m, _i, out: sizes.append(out[0].numel()))
                 for mod in model.modules() if not list(mod.children())]
        model(torch.empty(1, 3, size, size))
        for h in hooks:
            h.remove()
    return sum(p.numel() for p in model.parameters()), sum(sizes), max(sizes)


# --------------------------------------------------------------------------- the group
class _Member:
    """A run of a group: its :class:`Run`, index in the jobs, lock, RNG and batch order."""

    def __init__(self, index: int, run: Run, lock, fresh: bool, device: str):
        self.index, self.run, self.lock, self.fresh = index, run, lock, fresh
        self.rng = rng_state(device)                  # the run's RNG, as torch's global one alone
        self.generator = _generator(self.rng, device)
        self.order = functools.lru_cache(maxsize=2)(epoch_order)
        self.error: Optional[BaseException] = None
        self.result: Optional[TrainResult] = None

    def batch(self, step: int):
        r = self.run
        return get_batch(r.data, step, r.cfg, order=self.order)

    def save_rng(self, device: str) -> None:
        """Make torch's global RNG this run's (a checkpoint records it)."""
        if device == "cuda":
            states = list(self.rng["cuda"])
            states[torch.cuda.current_device()] = self.generator.get_state()
            self.rng["cuda"] = states
        else:
            self.rng["torch"] = self.generator.get_state()
        set_rng_state(self.rng, device)


def _generator(rng: dict, device: str) -> torch.Generator:
    g = torch.Generator(device)
    if device == "cuda":
        g.set_state(rng["cuda"][torch.cuda.current_device()])
    else:
        g.set_state(rng["torch"])
    return g


def train_group(jobs: Sequence[tuple], *, resume: bool = True,
                progress: Union[None, Callable, Sequence] = None) -> list:
    """Train the runs ``jobs`` in lockstep: one batched step over all their models.

    Parameters
    ----------
    jobs : sequence of (path, TrainConfig, out)
        What :func:`porder.train.train` takes, one run each; their
        :func:`lockstep_key` must be equal (ValueError otherwise).
    resume : bool
        As for ``train``: continue each run from its checkpoint.
    progress : callable or sequence, optional
        ``progress(i, step, steps, stats)`` for job i, or one :data:`Progress`
        (or None) per job.

    Returns
    -------
    list, per job: its :class:`TrainResult`, or the exception that stopped it
    (a refused run folder, a bad file, :class:`TrainingDiverged`, ...): the
    other runs go on. KeyboardInterrupt stops them all (each keeps its last
    checkpoint); an error of the group's step (out of memory) is every
    running member's.
    """
    if not jobs:
        return []
    cfgs = [cfg.validate() for _, cfg, _ in jobs]
    if dist_env().active:
        raise ValueError("lockstep training runs in one process; train under torchrun alone")
    device = resolve_device(cfgs[0].device)
    keys = {lockstep_key(c, resolve_device(c.device)) for c in cfgs}
    if len(keys) > 1:
        raise ValueError(f"runs trained in lockstep must share {', '.join(KEY_FIELDS)} and "
                         f"device; got {len(keys)} different sets")
    results: list = [None] * len(jobs)
    members: list[_Member] = []
    datas: dict = {}
    env = dist_env()
    cfg0 = cfgs[0]
    try:
        with torch_settings(device, cfg0.deterministic, cfg0.threads):
            for i, (path, cfg, out) in enumerate(jobs):
                out = Path(out)
                try:
                    lock, meta, ckpt, state = open_run(path, cfg, out, resume=resume)
                except Exception as e:
                    results[i] = e
                    continue
                try:
                    key = (str(Path(path).resolve()), cfg.reorder, cfg.patch, cfg.bins,
                           cfg.order_seed)
                    if key not in datas:
                        datas[key] = load_data(path, cfg, device)
                    run = Run.start(path, cfg, out, device, meta, ckpt, _progress(progress, i),
                                    env, state, data=datas[key])
                    members.append(_Member(i, run, lock, ckpt is None, device))
                except BaseException as e:
                    _close(lock, out, ckpt is None)
                    if not isinstance(e, Exception):
                        raise
                    results[i] = e
            for part in _by_shape(members):
                _train(part, device)
    finally:
        for mb in members:   # a fresh run stopped before its first checkpoint leaves nothing
            _close(mb.lock, mb.run.out, mb.fresh)
    for mb in members:
        results[mb.index] = mb.error if mb.error is not None else mb.result
    return results


def _progress(progress, i: int):
    if progress is None:
        return None
    if callable(progress):
        return functools.partial(progress, i)
    return progress[i]


def _close(lock, out: Path, remove: bool) -> None:
    if remove:
        remove_unstarted_run(out)
    if lock is not None:
        lock.release(remove_folder=True)


def _by_shape(members: list) -> list[list]:
    """Members whose models have the same shapes (image size, classes) train together."""
    parts: dict = {}
    for mb in members:
        shape = tuple((n, tuple(p.shape)) for n, p in mb.run.model.named_parameters())
        parts.setdefault(shape, []).append(mb)
    return list(parts.values())


def _train(members: list, device: str) -> None:
    """Train ``members`` (same shapes) to the end: the runs furthest behind first, each
    stretch in lockstep; then each run's result.json and curves."""
    active = list(members)
    started = [mb for mb in active if not mb.run.rows]
    if started:  # the untrained models: the curves start at step 0
        _record(started, [dict(UNTRAINED) for _ in started], None, device)
    _report(active)
    while True:
        active = [mb for mb in active if mb.error is None and mb.run.step < mb.run.cfg.steps]
        if not active:
            break
        low = min(mb.run.step for mb in active)
        part = [mb for mb in active if mb.run.step == low]
        ahead = [mb.run.step for mb in active if mb.run.step > low]
        _advance(part, min(ahead + [part[0].run.cfg.steps]), device)
    for mb in members:
        if mb.error is None:
            try:
                mb.result = mb.run.finish()
            except Exception as e:
                mb.error = e


def _advance(part: list, stop: int, device: str) -> None:
    """Train ``part`` (all at one step) in lockstep up to step ``stop``, or until one of
    them diverges (the others then go on in a new stretch). An error of the group's
    step (out of memory) stops every member: it is each one's result."""
    try:
        _stretch(part, stop, device)
    except Exception as e:
        for mb in part:
            if mb.error is None:
                mb.error = e


def _stretch(part: list, stop: int, device: str) -> None:
    runs = [mb.run for mb in part]
    cfg = runs[0].cfg
    m, step = len(runs), runs[0].step
    for r in runs:
        r.net.train()
    net = StackedNet([r.model for r in runs], [mb.generator for mb in part])
    opt = _stack_optimizer(net, [r.opt for r in runs], [r.model for r in runs], cfg.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=runs[0].scaler.is_enabled())
    if scaler.is_enabled():
        scaler.load_state_dict(runs[0].scaler.state_dict())

    def fetch(s):
        return [mb.batch(s) for mb in part]

    with Prefetch(fetch, step, stop, background=background_batches(device)) as batches:
        interval = _GroupInterval(m, device)
        reported = time.perf_counter()
        while step < stop:
            got, waited = batches.get(step)
            interval.waited += waited
            x = torch.stack([g[0] for g in got], 1)                # (B, M, 3, S, S)
            x = x.view(x.shape[0], -1, *x.shape[3:])               # (B, M*3, S, S)
            y = torch.stack([g[1] for g in got])                   # (M, B)
            with memory_hint(f"training {m} {cfg.arch} models in lockstep (--batch-size "
                             f"{cfg.batch_size}, --width {cfg.width:g})",
                             "train fewer runs at once (or lower --batch-size)"):
                logits, losses = group_step(net, opt, scaler, x, y, cfg, device)
            step += 1
            for r in runs:
                r.step = step
            interval.add(logits, losses, y)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                net.copy_to([r.model for r in runs])
                _unstack_optimizer(net, opt, [r.opt for r in runs], [r.model for r in runs])
                for r in runs:
                    if scaler.is_enabled():
                        r.scaler.load_state_dict(scaler.state_dict())
                _record(part, interval.stats(), interval.started, device, net)
                _report(part)
                if any(mb.error is not None for mb in part):
                    return
                interval = _GroupInterval(m, device)
            elif any(r.progress for r in runs):
                now = time.perf_counter()
                running = now - reported > 0.5
                if running:
                    reported = now
                for i, r in enumerate(runs):
                    r.report(interval.running(i) if running else None)


def group_step(net: StackedNet, opt, scaler, x: torch.Tensor, y: torch.Tensor,
               cfg: TrainConfig, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One Adam step of the group on inputs ``x`` (B, M*3, S, S) and labels ``y`` (M, B):
    (logits (M, B, classes), each model's mean loss (M,))."""
    with autocast(device, cfg):
        logits = net.forward(x, True)                                  # (M, B, classes)
        losses = F.cross_entropy(loss_input(logits).flatten(0, 1), y.flatten(),
                                 reduction="none").view(net.m, -1).mean(1)   # (M,)
    opt.zero_grad(set_to_none=True)
    scaler.scale(losses.sum()).backward()
    scaler.step(opt)
    scaler.update()
    return logits, losses


def _report(members: list) -> None:
    for mb in members:
        if mb.error is None:
            mb.run.report(mb.run.rows[-1])


def _record(part: list, stats: list, started: Optional[float], device: str,
            net: Optional[StackedNet] = None) -> None:
    """Evaluate the members together and append each one's row and checkpoint; a member
    whose loss is not finite is stopped (``mb.error``)."""
    runs = [mb.run for mb in part]
    t0 = time.perf_counter()
    if net is None:
        net = StackedNet([r.model for r in runs], [mb.generator for mb in part])
    evaluations = _evaluate(net, runs, device)
    eval_s = (time.perf_counter() - t0) / len(runs)
    for mb, st, (loss, acc) in zip(part, stats, evaluations):
        mb.save_rng(device)
        try:
            mb.run.record(st, started, (loss, acc, eval_s))
        except Exception as e:       # TrainingDiverged, or its folder cannot be written
            mb.error = e


@torch.no_grad()
def _evaluate(net: StackedNet, runs: list, device: str) -> list[tuple[float, float]]:
    """Each model's mean cross-entropy and accuracy on its own run's test split, the
    models evaluated together (about ``eval_batch`` images per forward pass)."""
    cfg = runs[0].cfg
    n = len(runs[0].data.test_y)
    full = runs[0].step >= cfg.steps                     # the last step: the whole split
    if any(len(r.data.test_y) != n for r in runs):      # test splits of other sizes: alone
        net.copy_to([r.model for r in runs])
        return [evaluate(r.model, r.data, r.cfg, device, full=full) for r in runs]
    subset = None if full else eval_indices(n, cfg.eval_images)   # (k,) or None
    pick = None if subset is None else torch.from_numpy(subset).to(runs[0].data.test_y.device)
    if pick is not None:
        n = len(pick)
    m = len(runs)
    chunk = max(1, -(-cfg.eval_batch // m))
    loss = torch.zeros(m, dtype=torch.float64, device=runs[0].data.test_x.device)
    correct = torch.zeros(m, dtype=torch.int64, device=loss.device)
    with memory_hint(f"evaluating {m} {cfg.arch} models in lockstep at --width {cfg.width:g}",
                      "train fewer runs at once (or lower --width)"):
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            idx = slice(lo, hi) if pick is None else pick[lo:hi]
            x = torch.stack([r.data.to_input(r.data.test_x[idx]) for r in runs], 1)
            x = x.view(x.shape[0], -1, *x.shape[3:])                   # (b, M*3, S, S)
            y = torch.stack([r.data.test_y[idx] for r in runs])        # (M, b)
            with autocast(device, cfg):
                logits = net.forward(x, False)                         # (M, b, classes)
            per = F.cross_entropy(loss_input(logits).flatten(0, 1), y.flatten(),
                                  reduction="none").view(m, -1)
            loss += per.sum(1).double()
            correct += (logits.argmax(2) == y).sum(1)
    for r in runs:
        r.net.train()
    return [(v / n, c / n) for v, c in zip(loss.tolist(), correct.tolist())]


class _GroupInterval:
    """The training statistics of M models since the last row, summed on the device."""

    def __init__(self, m: int, device: str):
        self.loss_sum = torch.zeros(m, dtype=torch.float64, device=device)
        self.correct = torch.zeros(m, dtype=torch.int64, device=device)
        self.losses: list = []           # each step's (M,) losses, on the device
        self.seen = 0                    # images per model
        self.waited = 0.0
        self.started = time.perf_counter()

    def add(self, logits: torch.Tensor, losses: torch.Tensor, y: torch.Tensor) -> None:
        b = y.shape[1]
        self.seen += b
        self.loss_sum += losses.detach().double() * b
        self.losses.append(losses.detach())
        self.correct += (logits.detach().argmax(2) == y).sum(1)

    def running(self, i: int) -> dict:
        return {"loss": self.loss_sum[i].item() / self.seen,
                "acc": self.correct[i].item() / self.seen}

    def stats(self) -> list[dict]:
        device = self.loss_sum.device.type
        sync(device)
        dt = time.perf_counter() - self.started
        per_step = torch.stack(self.losses).double().T.tolist()        # (M, steps)
        sums, correct = self.loss_sum.tolist(), self.correct.tolist()
        out = []
        for i in range(len(sums)):
            st = interval_stats(sums[i], correct[i], self.seen, self.waited, dt)
            st["train_loss_steps"] = step_loss_field(per_step[i])
            out.append(st)
        return out


__all__ = ["KEY_FIELDS", "StackedNet", "group_bytes", "lockstep_key", "train_group"]
