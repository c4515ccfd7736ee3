"""The statistics of a results row and of a suite of rows: paired intervals, verdicts, mean ranks.

Every method of a row is run on the same labelled sets (one per seed), so the comparison of two methods is
paired: the per-seed differences, their mean and a Student-t interval. A verdict says "wins" only when the
whole interval lies above zero, "loses" when it lies below, and "level" when it spans zero. Accuracies are
in percent throughout.
"""

from __future__ import annotations

import math
import statistics

VERDICTS = ("wins", "level", "loses")

# Differences within this many points count as zero: accuracies are float32, so two methods with the same
# number of correct test examples can differ in the sixth digit (95.3793108 against 95.3793097).
TIE_POINTS = 1e-3


def paired_interval(diffs: list[float], level: float = 0.95) -> dict:
    """Mean of per-seed differences with its two-sided Student-t interval ({"mean", "low", "high", "n"}).

    One difference has no spread: its interval is the point itself, and verdict() calls that level."""
    from scipy.stats import t

    n = len(diffs)
    if n == 0:
        raise ValueError("paired_interval needs at least one difference")
    mean = statistics.fmean(diffs)
    if n == 1:
        return {"mean": mean, "low": mean, "high": mean, "n": 1, "level": level}
    half = t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "level": level}


def verdict(interval: dict) -> str:
    """'wins' when the interval lies above zero, 'loses' when below, 'level' when it spans zero (or n = 1)."""
    if interval["n"] < 2:
        return "level"
    if interval["low"] > TIE_POINTS:
        return "wins"
    if interval["high"] < -TIE_POINTS:
        return "loses"
    return "level"


def ranks(means: dict[str, float]) -> dict[str, float]:
    """Rank of each method by mean accuracy, 1 = best; tied means (within TIE_POINTS) share their average rank."""
    order = sorted(means, key=lambda m: -means[m])
    out, i = {}, 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and abs(means[order[j + 1]] - means[order[i]]) < TIE_POINTS:
            j += 1
        for m in order[i:j + 1]:
            out[m] = (i + j) / 2 + 1
        i = j + 1
    return out


def mean_ranks(tables: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each method's mean rank over the tables (table -> method -> mean accuracy), over the methods every
    table ran (a method missing from one table is left out, so every rank counts the same field)."""
    common = set.intersection(*(set(m) for m in tables.values())) if tables else set()
    per_table = [ranks({m: means[m] for m in common}) for means in tables.values()]
    return {m: statistics.fmean(r[m] for r in per_table) for m in sorted(common)}


def suite_summary(rows: list[dict]) -> dict:
    """Wins / levels / losses of ours against the best baseline, and the mean ranks, over rows that each have
    "name", "verdict" and "means" (method -> mean accuracy, ours included)."""
    counts = {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}
    at_or_above = sum(r["means"]["ours"] >= max(v for m, v in r["means"].items() if m != "ours") - TIE_POINTS
                      for r in rows)
    return {"tables": len(rows), **counts, "ours_mean_at_or_above_best": at_or_above,
            "mean_ranks": mean_ranks({r["name"]: r["means"] for r in rows})}
