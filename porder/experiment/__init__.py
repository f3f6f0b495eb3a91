"""The paper's experiment: train the same CNNs on differently ordered copies of a dataset.

:func:`compare` reorders SOURCE once per (measure, patch) into HDF5 caches,
trains every architecture x seed on each with identical hyperparameters (the
same seed gives the same initial weights and the same batch order on every
ordering, so runs are paired), and writes

* ``summary.csv`` / ``summary.md``: per run and mean +- std over seeds: final
  and best test accuracy, steps to reach 90% and 95% of the ``none`` baseline's
  final test accuracy, the speed-up against ``none`` and the area under the
  test-accuracy curve (see :func:`run_summary`);
* ``paired.csv`` and the verdict of ``summary.md``: every ordering against
  ``none`` and against ``random``, the paired differences over seeds of the
  area and of the steps to 95%, with 95% t intervals and a one-line verdict
  (:func:`paired_comparisons`, :mod:`.stats`);
* ``fig4_accuracy_<arch>_p<patch>.png``: train and test accuracy against steps,
  one line per measure, seed spread shaded and each seed drawn thin (the paper's Fig. 4);
* ``fig5_loss_<arch>.png``: training loss against steps for every patch size
  (the paper's Fig. 5).

Layout of the output folder::

    DIR/compare.json                     the options of the comparison
    DIR/data/none.h5, DIR/data/mi-p8.h5  the caches (reused when complete)
    DIR/runs/<arch>/<measure>[-p<patch>]/seed<k>/   one `porder train` run folder each

Running the same comparison again skips completed runs, resumes a partial run
from its checkpoint and a partial cache from its ``.part`` file.

Modules: :mod:`.plan` (what to build and train, what is done), :mod:`.estimate`
(how long the rest takes here, for ``--dry-run``), :mod:`.run`
(:func:`compare`), :mod:`.summary` (steps-to, speed-up, AUC, paired verdicts;
CSV and Markdown tables), :mod:`.stats` (t intervals, pure Python),
:mod:`.plots` (the paper's Fig. 4 and Fig. 5) and :mod:`.preset` (``--preset
paper``).
"""
from __future__ import annotations

from .plan import Arm, CacheItem, Plan, RunItem, make_plan, parse_list
from .plots import write_figures
from .run import CompareResult, compare
from .summary import (
    PAIRED_FIELDS,
    SUMMARY_FIELDS,
    auc,
    paired_comparisons,
    run_summary,
    speedup,
    steps_to,
    summarise,
    write_csv,
    write_markdown,
)

__all__ = [
    "PAIRED_FIELDS", "SUMMARY_FIELDS", "Arm", "CacheItem", "CompareResult", "Plan", "RunItem",
    "auc", "compare", "make_plan", "paired_comparisons", "parse_list", "run_summary",
    "speedup", "steps_to", "summarise", "write_csv", "write_figures", "write_markdown",
]
