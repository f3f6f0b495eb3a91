"""``porder compare --preset paper``: the paper's Fig. 4 experiment, every value in one place.

:data:`PAPER` holds each option of :func:`porder.experiment.compare` that the
preset sets. A value the paper states comes with the paper's sentence; a value
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

PRESETS = {"paper": PAPER}
PRESET_FIXED = {"paper": PAPER_FIXED}


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
