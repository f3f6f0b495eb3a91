"""experiment.summary.auc on curves that do not start at step 0 (issue 20: the mutant
that divides by the last step instead of the step range survived every other test,
whose rows all start at step 0)."""
from __future__ import annotations

import pytest

from porder.experiment.summary import auc, run_summary


def rows(steps, accs):
    return [{"step": s, "test_acc": a} for s, a in zip(steps, accs, strict=True)]


def test_auc_divides_by_the_step_range():
    # By hand: trapezoids (200 - 100) * (0.2 + 0.4) / 2 = 30 and (400 - 200) * (0.4 + 0.8) / 2
    # = 120; area 150 over the range 400 - 100 = 300 -> 0.5 (dividing by 400 would give 0.375).
    assert auc(rows([100, 200, 400], [0.2, 0.4, 0.8])) == pytest.approx(0.5, rel=1e-12)


def test_a_constant_curve_has_its_value_as_auc_wherever_it_starts():
    # Accuracy 0.7 from step 1000 to 1500: area 0.7 * 500 over the range 500 -> 0.7.
    assert auc(rows([1000, 1250, 1500], [0.7, 0.7, 0.7])) == pytest.approx(0.7, rel=1e-12)
    # a resumed run's rows (steps 500..1000) and the same curve shifted to start at 0 agree
    a = [0.1, 0.5, 0.6, 0.9]
    assert auc(rows([500, 600, 800, 1000], a)) == pytest.approx(auc(rows([0, 100, 300, 500], a)))


def test_run_summary_reports_that_auc():
    s = run_summary(rows([100, 200, 400], [0.2, 0.4, 0.8]), baseline_final=0.8)
    assert s["auc_test_acc"] == pytest.approx(0.5, rel=1e-12)
    assert s["steps"] == 400 and s["steps_to_95"] == 400 and s["steps_to_90"] == 400
