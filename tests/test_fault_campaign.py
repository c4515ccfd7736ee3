"""The kill -9 fault campaign (tests/scripts/fault_campaign.py): three of its kills in CI, drawn from a seed
that the test prints, and its comparison of final states, which must see a single differing bit. The whole
campaign is a documented command with its figures in docs/HEALTH.md, "Fault campaign"."""

from __future__ import annotations

import copy
import os
import random
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "tests" / "scripts"))
import fault_campaign  # noqa: E402

TWO_PROCESSES, ONE_PROCESS = ["ddp2", "accum2"], ["ddp1", "workers1", "ema"]  # the settings quick enough for CI


def subset(seed: int) -> list[fault_campaign.Trial]:
    """One trial of a 2-process setting and two of a 1-process one (two kill moments, one reference run), with
    seeded settings, storages and moments."""
    storages = ("file", "s3") if fault_campaign.s3_available() else ("file",)
    one = random.Random(seed).choice(ONE_PROCESS)
    return fault_campaign.plan(1, seed, TWO_PROCESSES, storages) + fault_campaign.plan(2, seed, [one], storages)


@pytest.mark.slow
def test_seeded_kills_resume_bit_identical(digits_shards, tmp_path, capsys):
    """Each trial kills a run with SIGKILL (at a seeded point or time), resumes it, and compares its end with the
    uninterrupted run's: weights, optimizer, chains, RNG states, counters, which checkpoint was tested."""
    seed = int(os.environ.get("FAULT_CAMPAIGN_SEED", random.randrange(10**6)))
    trials = subset(seed)
    with capsys.disabled():
        print(f"\nfault campaign subset: FAULT_CAMPAIGN_SEED={seed} replays it: "
              + "; ".join(f"{t.setting} {t.storage} {t.kill}" for t in trials))
    rows = fault_campaign.run_campaign(trials, tmp_path, digits_shards, log=lambda _: None)
    with capsys.disabled():
        print("\n".join(fault_campaign.line(row) for row in rows))
    for row in rows:
        assert row["ok"], f"FAULT_CAMPAIGN_SEED={seed}: {fault_campaign.line(row)}\n{row.get('output')}"
    assert sum(row["killed"] for row in rows) >= 2, "the kills came too late to kill anything"


def test_the_comparison_sees_one_bit(tmp_path):
    """A final state differs from its copy when one bit of a weight, an Adam moment, a chain or an RNG state
    flips, or when another checkpoint was tested."""
    rng = torch.Generator().manual_seed(0)
    state = {"model.pt": {"w": torch.randn(4, 4, generator=rng)},
             "optimizer.pt": {"optimizer": {"state": {0: {"exp_avg": torch.randn(4, generator=rng)}}}},
             "rank-00000.pt": {"bank": {"z": torch.randn(8, 2, generator=rng)},
                               "rng": {"torch_cpu": torch.get_rng_state(), "python": random.getstate()}},
             "metrics.json": {"tested_checkpoint": "best-000020", "test": {"accuracy": 0.5}}}
    assert fault_campaign.differences(state, copy.deepcopy(state)) == []

    def flipped(path: list, bit: int = 0):
        other = copy.deepcopy(state)
        *parents, last = path
        node = other
        for key in parents:
            node = node[key]
        if isinstance(node[last], torch.Tensor):
            flat = node[last].view(torch.uint8).view(-1)
            flat[0] ^= 1 << bit
        else:
            node[last] = "best-000010"
        return fault_campaign.differences(state, other)

    assert flipped(["model.pt", "w"]) == ["/model.pt/w"]
    moment = ["optimizer.pt", "optimizer", "state", 0, "exp_avg"]
    assert flipped(moment, bit=3) == ["/" + "/".join(map(str, moment))]
    assert flipped(["rank-00000.pt", "bank", "z"]) == ["/rank-00000.pt/bank/z"]
    assert flipped(["rank-00000.pt", "rng", "torch_cpu"], bit=7) == ["/rank-00000.pt/rng/torch_cpu"]
    assert flipped(["metrics.json", "tested_checkpoint"]) == ["/metrics.json/tested_checkpoint"]
    python_rng = copy.deepcopy(state)
    python_rng["rank-00000.pt"]["rng"]["python"] = random.Random(1).getstate()
    where = {d.rsplit("[", 1)[0] for d in fault_campaign.differences(state, python_rng)}
    assert where == {"/rank-00000.pt/rng/python[1]"}


@pytest.mark.parametrize("kills", [8, 56])
def test_the_plan_covers_every_setting_and_moment(kills):
    """Every setting in turn, each with its kill moments in turn; the same seed draws the same plan."""
    trials = fault_campaign.plan(kills, 3)
    assert trials == fault_campaign.plan(kills, 3) and trials != fault_campaign.plan(kills, 4)
    assert {t.setting for t in trials} == set(fault_campaign.SETTINGS)
    if kills == 56:
        for name, setting in fault_campaign.SETTINGS.items():
            assert {t.point for t in trials if t.setting == name} == set(setting.points), name
