"""ssl_ebm.stats and ssl_ebm.protocol: paired intervals, verdicts, ranks, the protocols' overrides and budgets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ssl_ebm import protocol as P
from ssl_ebm import stats


def test_paired_interval_matches_the_t_formula():
    diffs = [1.0, 2.0, 0.5, 1.5, 3.0]
    got = stats.paired_interval(diffs)
    mean, sd = float(np.mean(diffs)), float(np.std(diffs, ddof=1))
    half = 2.7764451051977987 * sd / math.sqrt(5)  # t(0.975, 4)
    assert got["n"] == 5 and got["mean"] == pytest.approx(mean)
    assert got["low"] == pytest.approx(mean - half) and got["high"] == pytest.approx(mean + half)


def test_verdict_needs_the_whole_interval_on_one_side():
    assert stats.verdict(stats.paired_interval([1.0, 2.0, 1.5, 1.2])) == "wins"
    assert stats.verdict(stats.paired_interval([-1.0, -2.0, -1.5, -1.2])) == "loses"
    # a positive mean whose interval spans zero is level, not a win (letter's old t = 2.41 over 5 seeds)
    diffs = [2.0, -1.0, 3.0, 0.5, 1.0]
    got = stats.paired_interval(diffs)
    assert got["mean"] > 0 and got["low"] < 0 and stats.verdict(got) == "level"
    assert stats.verdict(stats.paired_interval([5.0])) == "level"  # one seed has no interval
    # float32 noise on a tie is not a win
    assert stats.verdict(stats.paired_interval([1e-6, 2e-6, 1e-6])) == "level"


def test_ranks_share_ties_and_mean_ranks_use_common_methods():
    assert stats.ranks({"a": 90.0, "b": 80.0, "c": 80.0, "d": 70.0}) == {"a": 1.0, "b": 2.5, "c": 2.5, "d": 4.0}
    tables = {"t1": {"ours": 90.0, "lr": 80.0, "rf": 70.0}, "t2": {"ours": 60.0, "lr": 80.0, "rf": 70.0, "gb": 1.0}}
    assert stats.mean_ranks(tables) == {"lr": 1.5, "ours": 2.0, "rf": 2.5}  # gb ran on one table only


def test_suite_summary_counts_verdicts_and_means_at_or_above_the_best():
    rows = [{"name": "a", "verdict": "wins", "means": {"ours": 90.0, "lr": 80.0}},
            {"name": "b", "verdict": "level", "means": {"ours": 80.0, "lr": 80.0}},
            {"name": "c", "verdict": "loses", "means": {"ours": 70.0, "lr": 80.0}}]
    got = stats.suite_summary(rows)
    assert (got["wins"], got["level"], got["loses"], got["ours_mean_at_or_above_best"]) == (1, 1, 1, 2)
    assert got["mean_ranks"] == {"lr": 1.5, "ours": 1.5}  # (2 + 1.5 + 1) / 3 each


def test_protocol_overrides_and_budgets():
    assert P.train_overrides("realistic", 500) == ["train.steps=500", "train.select=final", "health.patience=0"]
    assert P.train_overrides("oracle-val", 500) == ["train.steps=500", "train.select=val"]
    assert not P.reads_validation("realistic") and P.reads_validation("oracle-val")
    with pytest.raises(ValueError, match="protocol 'test'"):
        P.train_overrides("test", 1)
    b = P.network_budget("realistic", 2000).record()
    assert b == {"updates": 2000, "restarts": 1, "settings_tried": 1,
                 "chosen_by": "fixed settings; the weights at the end of training"}
    assert "cross-validation" in P.sklearn_budget("realistic", 5).chosen_by
    assert P.sklearn_budget("oracle-val", 5).chosen_by == "the validation split (setting)"
    assert P.cv_folds([0] * 10 + [1] * 10) == 5 and P.cv_folds([0, 0, 0, 1, 1, 1]) == 3
    assert P.cv_folds([0, 1, 2, 2]) == 2  # never fewer than 2 folds
