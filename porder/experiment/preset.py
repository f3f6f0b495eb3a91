"""``porder compare --preset paper`` (the paper's Fig. 4 experiment) and ``--preset
paper-cpu`` (the same structure, sized to finish on a 2-core CPU within the hour): every
value in one place.

:data:`PAPER` holds each option of :func:`porder.experiment.compare` that the
preset sets; :data:`PAPER_CPU` keeps the paper's structure and says, value by
value, what it shrinks and why. A value the paper states comes with the paper's sentence; a value
the paper leaves open comes with "chosen: ... because ...". :data:`PAPER_FIXED`
lists what porder always does and the paper states (Adam, cross-entropy, the
reference patch, ...), so the whole setup can be read here. Options given
explicitly on the command line override the preset (``--dry-run`` shows which).

Quotes are from Ghebrechristos & Alaghband, "Expediting Training Using
Information Theory-Based Patch Ordering Algorithm" (``shared/paper.md``).
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Setting:
    """One value of a preset and where it comes from (exactly one of ``paper``/``chosen``)."""

    value: object
    paper: Optional[str] = None     # the paper's sentence stating the value
    chosen: Optional[str] = None    # "chosen: ... because ..." for a value the paper leaves open

    def __post_init__(self):
        if (self.paper is None) == (self.chosen is None):
            raise ValueError("a preset setting needs exactly one of paper= or chosen=")

    @property
    def source(self) -> str:
        return f'paper: "{self.paper}"' if self.paper else f"chosen: {self.chosen}"


# ---------------------------------------------------------------- the paper
# Keys are the keyword arguments of porder.experiment.compare (and the CLI's destinations).
PAPER: dict[str, Setting] = {
    "archs": Setting(
        ["inception"],
        paper="Figure 4 shows results obtained when training Inception network to classify "
              "CIFAR100 (Top) and Cats vs Dogs (Bottom) datasets using slow learning rate and "
              "Adams optimization [18]."),
    "measures": Setting(
        ["none", "entropy", "psnr", "mi", "je", "kl", "l1", "l2", "ssim", "random"],
        chosen="every measure of the paper, the unmodified baseline and the `random` control, "
               "because the paper shows \"all the similarity and statistical measure-based patch "
               "ordering techniques\" against \"regular training\" (Fig. 4) but has no shuffled "
               "control; `random` separates the effect of an ordering from that of moving "
               "patches at all"),
    "patches": Setting(
        [4, 8, 16],
        paper="For computational efficiency PatchSize is taken from (4x4, 8x8, 16x16) and all "
              "samples are resized to 32x32 prior to preprocessing."),
    "size": Setting(
        32,
        paper="all samples are resized to 32x32 prior to preprocessing."),
    "steps": Setting(
        10_000,
        paper="However, all techniques converge to the same performance as the regular "
              "training when trained for 10000 iterations."),
    "batch_size": Setting(
        1,
        paper="We trained the networks using online training [21] mechanism, where error "
              "calculations and weight updates occur after every sample."),
    "norm": Setting(
        "group",
        chosen="GroupNorm in place of Inception's BatchNorm, because the paper names the "
               "network and online training but not its normalisation, and at batch 1 "
               "BatchNorm normalises each image by its own statistics: on `digits` (width "
               "0.125, lr 1e-4, seed 0) Inception with BatchNorm stayed at chance for 4,000 "
               "steps (test accuracy 7%; 96% at batch 32 in 300 steps), with GroupNorm it "
               "learnt (57% at step 4,000, rising). A comparison in which no network learns "
               "cannot show one learning faster"),
    "lr": Setting(
        1e-4,
        chosen="1e-4, because the paper says only \"slow learning rate\" and gives no number; "
               "1e-4 is a tenth of Adam's customary 1e-3 (porder's default), the usual meaning "
               "of a slow rate for Adam, and the rate of porder's own Dogs-vs-Cats benchmark"),
    "width": Setting(
        1.0,
        chosen="1.0 (the published Inception-v3 channel counts), because the paper cites "
               "Inception-v3 [4] and states no reduction; the 32x32 adaptation itself "
               "(stride-1 stem, no auxiliary head) is porder's, see porder/train/models.py"),
    "seeds": Setting(
        3,
        chosen="3, because the paper shows one curve per ordering and does not say how many "
               "runs it made; 3 is the fewest that give the verdict a t interval (2 degrees of "
               "freedom)"),
    "eval_every": Setting(
        200,
        chosen="200 steps (51 points per curve), because the paper plots test accuracy \"at "
               "different iterations\" without saying how often; 51 points resolve steps-to "
               "a target to 2% of the run at the cost of 50 test passes"),
    "bins": Setting(
        256,
        paper="The normalized histogram can be used as an estimate of the underlying "
              "probability of pixel intensities, i.e., p(i) = b_s(i)/N, where b_s(i) denotes "
              "the histogram entry of intensity value i in sample S"),
    "test_fraction": Setting(
        0.1,
        chosen="10% held out (porder's default), because Kaggle's Dogs-vs-Cats has no labelled "
               "test split and the paper does not say how it evaluated; CIFAR-100 brings its "
               "own test split and ignores this value"),
    "eval_images": Setting(
        1000,
        chosen="1,000 test images per curve point (a fixed seeded subset, the same for every "
               "run; the last step on the whole test split), because 50 evaluations of "
               "CIFAR's 10,000 test images are 500,000 forward passes per run, 50 times the "
               "10,000 images a run trains on, and made evaluation about 13,200 of the 13,300 "
               "hours `--dry-run` estimated on a CPU; with 1,000 they are 60,000. One point's "
               "accuracy on 1,000 images has a standard error of at most 1.6 points "
               "(0.5 / sqrt(1000)), and every run is scored on the same images, so the paired "
               "differences behind the verdict share that sampling; the final accuracy, and "
               "with it the targets of steps-to, come from the whole split"),
}

# What porder always does and the paper states: not options of the preset, shown with it.
PAPER_FIXED: dict[str, Setting] = {
    "optimizer": Setting(
        "Adam", paper="For each network we used Adams optimization technique with "
                      "cross-entropy loss to gather empirical training, validation and test data."),
    "Adam settings": Setting(
        "betas (0.9, 0.999), eps 1e-8, no weight decay, constant rate",
        chosen="torch's defaults, because the paper names Adam and nothing else about it"),
    "loss": Setting(
        "softmax cross-entropy",
        paper="This algorithm employs Adam optimization and the SoftMax cross-entropy loss, to "
              "update network parameters."),
    "fixed setup": Setting(
        "same hyperparameters and seeds for every ordering",
        paper="During training all parameters except for the training dataset are fixed."),
    "reference patch": Setting(
        "patch (0, 0), row-major chain",
        paper="If we take patch p(0,0) to be the reference patch, Algorithm 1 in the first "
              "iteration computes MI index of every other patch with the reference patch and "
              "moves the one with the highest index to position (0,1) and updates the "
              "reference patch."),
    "colour": Setting(
        "per channel, averaged over R, G, B",
        paper="Since the dataset consists of color (RGB) images the algorithm computes the "
              "index of each channels and returns the average ."),
    "datasets": Setting(
        "SOURCE (give CIFAR-100 or Dogs-vs-Cats)",
        paper="For evaluation we used CATSvsDOGS [16], and CIFAR100 [17] datasets."),
}

# ------------------------------------------------- the paper, sized for a CPU
# The paper's structure (batch 1, Adam at a slow rate, every ordering, patches 4/8/16,
# 3 seeds) kept; what must shrink to finish end to end (caches, training, summary,
# figures, verdicts) within an hour on a 2-core CPU with --lockstep, shrunk, and said.
# CPU costs quoted: time.process_time of one step (forward, backward, Adam), 1 thread,
# best of 4-8, porder's models, 32x32 inputs, 10 classes, on the 2-core development machine.
PAPER_CPU: dict[str, Setting] = {
    **{k: PAPER[k] for k in ("measures", "patches", "size", "batch_size", "lr", "seeds",
                             "bins")},
    "archs": Setting(
        ["resnet"],
        chosen="ResNet-18 in place of Inception, because the paper trains \"Inception [4], "
               "VGG [5] and ResNet [6]\" and ResNet is the one of them that both learns at "
               "batch 1 within the steps below and fits the hour: on `digits` (width 0.125, lr "
               "1e-4, seed 0) its test accuracy rose from 8% to 41% at step 2,000, 73% at "
               "4,000 and 81% at 5,000, while VGG's stayed at chance (7% at step 3,000: its "
               "last block's BatchNorm normalises 2x2 maps of a single image); and a batch-1 "
               "Inception step costs 39.6 ms of CPU against ResNet's 6.6 ms (in lockstep "
               "groups of 28: 2.05 ms per model), its evaluation 7.7 ms per image against "
               "0.45 ms"),
    "norm": Setting(
        "batch",
        chosen="BatchNorm, as published, because ResNet learns at batch 1 with it (its "
               "residual connections carry what a single image's statistics normalise away): "
               "the accuracies quoted for the network above and the result in the docs were "
               "measured with it"),
    "width": Setting(
        0.125,
        chosen="0.125 (an eighth of the published channels), because at batch 1 a step is "
               "mostly per-layer overhead (ResNet: 6.6 ms at width 0.125, 12.7 ms at 0.25), so "
               "width buys time only down to about here, and it is the width of porder's "
               "lockstep benchmark (issue 22)"),
    "steps": Setting(
        5000,
        chosen="5,000 in place of the paper's 10,000, because 84 runs of 10,000 batch-1 steps "
               "take about half an hour of training alone here even in lockstep (3 groups of "
               "28 at 57 ms of CPU a step), leaving no room for load within the hour; 5,000 "
               "take about 15 minutes, and at 5,000 single-image steps (3 epochs of "
               "`digits`) the baseline is still climbing (81% at step 5,000, seed 0), which "
               "is the part of the curve the paper's claim is about (\"achieves similar "
               "accuracy as the unmodified dataset in 1/4 of the total iterations\")"),
    "eval_every": Setting(
        200,
        chosen="200 steps (26 points per curve), the paper preset's interval, because the "
               "paper plots test accuracy \"at different iterations\" without saying how "
               "often; 26 points resolve steps-to a target to 4% of the run"),
    "test_fraction": Setting(
        0.1,
        chosen="10% held out (porder's default), because `digits` has no test split: 180 "
               "test images, 1,617 training images"),
    "eval_images": Setting(
        500,
        chosen="500 test images per curve point (the whole split at the last step), because "
               "that is all of `digits`' 180 test images (26 points of 84 runs: about 3 "
               "minutes), while a larger source (CIFAR's 10,000) keeps the evaluation of 84 "
               "runs x 26 points within the hour"),
}

PAPER_CPU_FIXED: dict[str, Setting] = {
    **{k: v for k, v in PAPER_FIXED.items() if k != "datasets"},
    "datasets": Setting(
        "SOURCE (`digits` suggested: porder's built-in 1,797 handwritten digits, 10 classes)",
        chosen="`digits`, because it ships with porder (no download), its 28 caches are made "
               "in minutes, and a batch-1 ResNet learns it within the steps above, so "
               "steps-to and the verdict have a rising curve to measure; the paper's CIFAR-100 "
               "and Dogs-vs-Cats work too, at more time per cache and less learning per step"),
    "training": Setting(
        "--lockstep auto: the 84 runs in groups of M models, one batched step for all M",
        chosen="lockstep, because at batch 1 one step of M models in one computation pays the "
               "per-layer overhead once instead of M times; results do not depend on it"),
}

PRESETS = {"paper": PAPER, "paper-cpu": PAPER_CPU}
PRESET_FIXED = {"paper": PAPER_FIXED, "paper-cpu": PAPER_CPU_FIXED}


def preset_values(name: str) -> dict:
    """The option values of preset ``name`` (a fresh dict: lists are copies)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return {k: (list(s.value) if isinstance(s.value, list) else s.value)
            for k, s in PRESETS[name].items()}


def describe_preset(name: str, overridden: Optional[dict] = None, width: int = 100) -> str:
    """Every value of preset ``name`` with its source, as text (``--dry-run``).

    ``overridden`` maps option names given explicitly to their values; those
    lines show the value used and the preset's value.
    """
    overridden = overridden or {}
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    fmt = lambda v: ",".join(map(str, v)) if isinstance(v, list) else str(v)
    wrap = lambda text: textwrap.fill(text, width, initial_indent="      ",
                                      subsequent_indent="      ")
    lines = [f"preset {name} (explicit options override it):"]
    for key, s in PRESETS[name].items():
        if key in overridden:
            lines.append(f"  {key} = {fmt(overridden[key])}   (given; the preset's "
                         f"{fmt(s.value)}: {'paper' if s.paper else 'chosen'})")
        else:
            lines.append(f"  {key} = {fmt(s.value)}")
        lines.append(wrap(s.source))
    lines.append("  always (not options):")
    for key, s in PRESET_FIXED[name].items():
        lines.append(f"  {key}: {s.value}")
        lines.append(wrap(s.source))
    return "\n".join(lines)
