"""launch/evaluate.py: evaluate a checkpoint on a split, predict from shards / .npz / CSV, bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY, run_train

DIGITS = str(REPO / "configs" / "digits.yaml")


@pytest.fixture(scope="module")
def checkpoint(digits_shards, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("eval") / "run"
    run_train(["--config", DIGITS, *TINY, f"data.shards={digits_shards}", f"train.out_dir={out}", "train.steps=20"])
    metrics = json.loads((out / "metrics.json").read_text())
    return str(out / "checkpoints" / f"best-{metrics['best_step']:06d}"), metrics


def evaluate(*args: str, allow_pickle: bool = True) -> subprocess.CompletedProcess:
    flag = ["--allow-pickle"] if allow_pickle else []
    return subprocess.run([sys.executable, str(REPO / "launch" / "evaluate.py"), *args, *flag], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_evaluate_reproduces_the_training_test_accuracy(checkpoint, digits_shards, tmp_path):
    ckpt, metrics = checkpoint
    proc = evaluate(ckpt, "--split", "test", "--out", str(tmp_path / "m.json"))
    assert proc.returncode == 0, proc.stderr
    got = json.loads((tmp_path / "m.json").read_text())
    assert got["count"] == metrics["test"]["count"]
    assert got["accuracy"] == pytest.approx(metrics["test"]["accuracy"], abs=1e-6)
    val = json.loads(evaluate(ckpt, "--shards", digits_shards, "--split", "val").stdout)
    assert val["split"] == "val" and val["accuracy"] == pytest.approx(metrics["val_accuracy"], abs=1e-6)


def test_predict_from_shards_npz_and_csv_agree(checkpoint, digits_shards, tmp_path):
    ckpt, metrics = checkpoint
    proc = evaluate(ckpt, "--predict", digits_shards, "--split", "test", "--out", str(tmp_path / "p.csv"))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((tmp_path / "p.csv").read_text().splitlines()))
    assert len(rows) == metrics["test"]["count"]
    probs = np.array([[float(r[f"p_{k}"]) for k in range(10)] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    acc = np.mean([int(r["pred"]) == int(r["label"]) for r in rows])
    assert acc == pytest.approx(metrics["test"]["accuracy"], abs=1e-6)

    # the same examples as raw source features (digits pixels 0..16), standardised by evaluate.py
    from sklearn.datasets import load_digits

    manifest = json.loads((Path(digits_shards) / "manifest.json").read_text())
    raw = load_digits().data[manifest["split_indices"]["test"]]
    np.savez(tmp_path / "new.npz", x=raw)
    np.savetxt(tmp_path / "new.csv", raw, delimiter=",", header=",".join(f"f{i}" for i in range(64)), comments="")
    for name in ("new.npz", "new.csv"):
        out = tmp_path / f"{name}.json"
        proc = evaluate(ckpt, "--predict", str(tmp_path / name), "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        got = json.loads(out.read_text())
        assert got["class_names"] == manifest["class_names"]
        p = np.array([[r[f"p_{n}"] for n in got["class_names"]] for r in got["predictions"]])
        np.testing.assert_allclose(p, probs, atol=1e-4)


@pytest.mark.parametrize("make_input, fragment", [
    (lambda d: str(d / "missing.npz"), "not a readable .npz"),
    (lambda d: (np.savez(d / "nox.npz", y=np.zeros(3)), str(d / "nox.npz"))[1], "no array 'x'"),
    (lambda d: (np.savez(d / "shape.npz", x=np.zeros((3, 5))), str(d / "shape.npz"))[1], "expected (N, 64)"),
    (lambda d: ((d / "bad.csv").write_text("a,b,c\n1,2,3\n1,2,x\n"), str(d / "bad.csv"))[1], "not all numbers"),
    (lambda d: ((d / "f.txt").write_text("1"), str(d / "f.txt"))[1], "unknown input kind"),
    (lambda d: (np.savez(d / "nan.npz", x=np.full((2, 64), np.nan)), str(d / "nan.npz"))[1],
     "x holds NaN or infinite values"),
])
def test_bad_input_is_one_line_and_exit_2(checkpoint, tmp_path, make_input, fragment):
    ckpt, _ = checkpoint
    proc = evaluate(ckpt, "--predict", make_input(tmp_path), "--out", str(tmp_path / "p.csv"))
    assert proc.returncode == 2 and fragment in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_bad_checkpoint_and_output(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    proc = evaluate(str(tmp_path / "no-such-step-000010"))
    assert proc.returncode == 2 and "no such checkpoint" in proc.stderr
    (tmp_path / "step-000010").mkdir()
    (tmp_path / "step-000010" / "model.pt").write_bytes(b"")  # a save killed before COMPLETE
    proc = evaluate(str(tmp_path / "step-000010"))
    assert proc.returncode == 2 and "not a complete checkpoint" in proc.stderr
    proc = evaluate(ckpt, allow_pickle=False)  # a checkpoint is a pickle: only with the explicit flag
    assert proc.returncode == 2 and "--allow-pickle" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = evaluate(ckpt, "--predict", "x.npz")
    assert proc.returncode == 2 and "--out" in proc.stderr
    proc = evaluate(ckpt, "--out", str(tmp_path / "m.txt"))
    assert proc.returncode == 2 and ".json" in proc.stderr


def test_posterior_rule_averages_softmax_over_q(checkpoint, digits_shards, tmp_path):
    import torch

    sys.path.insert(0, str(REPO / "launch"))
    import evaluate as E

    ckpt, _ = checkpoint
    model = E.api.load(ckpt, allow_pickle=True).net
    x = torch.cat([b["x"] for b in E.data.eval_batches(digits_shards, "val", batch_size=64)])[:32]
    with torch.no_grad():
        mu, logvar = model.encoder(x)
        exact = torch.log_softmax(model.prior(mu), dim=-1)
        rule = E.posterior_logits(model, samples=200)
        proba = rule(x).exp()
        assert torch.allclose(proba.sum(-1), torch.ones(32), atol=1e-5)
        by_hand = torch.stack([torch.softmax(model.prior(mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)), -1)
                               for _ in range(2000)]).mean(0)
        assert (proba - by_hand).abs().max() < 0.05  # a Monte Carlo estimate of the same expectation
        class Collapsed(torch.nn.Module):  # q(z|x) collapsed on mu: the rule is f(mu) again
            def forward(self, x_):
                return mu, torch.full_like(logvar, -30.0)

        model.encoder = Collapsed()
        assert torch.allclose(E.posterior_logits(model, samples=4)(x), exact, atol=1e-5)
    proc = evaluate(ckpt, "--split", "val", "--samples", "16")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["rule"] == "posterior mean over 16 samples"
    bad = evaluate(ckpt, "--samples", "-1")
    assert bad.returncode == 2 and "--samples" in bad.stderr
