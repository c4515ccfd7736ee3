"""The weights' moving average (train.ema_decay): its arithmetic, and a real run that validates, keeps, tests
and resumes it."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, TINY, run_train
from ssl_ebm.ema import WeightAverage

DIGITS = str(REPO / "configs" / "digits.yaml")


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


def test_the_average_follows_the_ramped_decay_and_copies_integer_buffers():
    net = _net()
    avg = WeightAverage(net, decay=0.9)
    w0 = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net[1].num_batches_tracked += 7
    avg.update(net)  # first update: decay min(0.9, 1/10) = 0.1
    assert torch.allclose(avg.shadow["0.weight"], 0.1 * w0 + 0.9 * (w0 + 1.0))
    assert int(avg.shadow["1.num_batches_tracked"]) == 7
    for _ in range(200):
        avg.update(net)
    assert avg.rate() == 0.9  # the ramp has reached the configured decay
    assert torch.allclose(avg.shadow["0.weight"], w0 + 1.0, atol=1e-6)


def test_applied_puts_the_average_in_and_the_trained_weights_back():
    net = _net()
    avg = WeightAverage(net, decay=0.5)
    with torch.no_grad():
        net[0].weight.mul_(3.0)
        trained = {k: v.clone() for k, v in net.state_dict().items()}
    with avg.applied(net):
        assert not torch.equal(net[0].weight, trained["0.weight"])
        assert torch.equal(net[0].weight, avg.shadow["0.weight"])
    for k, v in net.state_dict().items():
        assert torch.equal(v, trained[k]), k


def test_a_bf16_model_is_averaged_in_fp32():
    net = torch.nn.Linear(4, 4).to(torch.bfloat16)
    avg = WeightAverage(net, decay=0.999)
    assert avg.shadow["weight"].dtype == torch.float32
    before = avg.shadow["weight"].clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    for _ in range(50):
        avg.update(net)
    assert not torch.equal(avg.shadow["weight"], before)  # small steps were not rounded away


def test_a_saved_average_of_another_model_is_refused():
    avg = WeightAverage(_net(), decay=0.9)
    other = WeightAverage(torch.nn.Linear(3, 4), decay=0.9)
    with pytest.raises(KeyError, match="does not match the model"):
        avg.load_state_dict(other.state_dict())


def _args(shards: str, out, *extra: str) -> list[str]:
    return ["--config", DIGITS, *TINY, f"data.shards={shards}", f"train.out_dir={out}", "train.steps=30",
            "train.checkpoint_every=10", "train.ema_decay=0.9", *extra]


def test_a_run_validates_keeps_and_tests_the_average(digits_shards, tmp_path):
    out = tmp_path / "run"
    run_train(_args(digits_shards, out))
    metrics = json.loads((out / "metrics.json").read_text())
    best = out / "checkpoints" / f"best-{metrics['best_step']:06d}"
    kept = torch.load(best / "model.pt", weights_only=True)
    average = torch.load(best / "ema.pt", weights_only=True)["shadow"]
    trained = torch.load(out / "checkpoints" / f"step-{metrics['best_step']:06d}" / "model.pt", weights_only=True)
    assert all(torch.equal(kept[k], average[k]) for k in kept)  # best-* holds the weights validated
    assert any(not torch.equal(kept[k], trained[k]) for k in kept if kept[k].is_floating_point())
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_accuracy" in r]
    assert evals and all("val_accuracy_trained" in r for r in evals)
    assert metrics["val_accuracy"] == max(r["val_accuracy"] for r in evals)

    from ssl_ebm import api  # the test figure is the kept average's, evaluated afresh
    model = api.load(str(best), allow_pickle=True)
    x, y = api.read_examples(digits_shards, "test")
    right = (model.predict(x) == y).float().mean().item()
    assert right == pytest.approx(metrics["test"]["accuracy"], abs=1.5 / len(y))  # data units and back: one example


def test_a_paused_run_resumes_with_its_average(digits_shards, tmp_path):
    whole, paused = tmp_path / "whole", tmp_path / "paused"
    run_train(_args(digits_shards, whole))
    run_train(_args(digits_shards, paused, "train.stop_after=20"))
    run_train(_args(digits_shards, paused))
    a = torch.load(whole / "checkpoints" / "step-000030" / "ema.pt", weights_only=True)
    b = torch.load(paused / "checkpoints" / "step-000030" / "ema.pt", weights_only=True)
    assert a["updates"] == b["updates"] == 30
    assert all(torch.equal(a["shadow"][k], b["shadow"][k]) for k in a["shadow"])


def test_a_decay_of_one_is_one_line(digits_shards, tmp_path):
    proc = run_train(_args(digits_shards, tmp_path / "r", "train.ema_decay=1.0"), check=False)
    assert proc.returncode == 2
    assert "train.ema_decay: got 1.0; must be in [0, 1)" in proc.stderr
