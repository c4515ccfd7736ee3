"""launch/diagnose.py's EM estimate of a pool's class shares (Saerens et al. 2002)."""

from __future__ import annotations

import sys

import numpy as np

from conftest import REPO

sys.path.insert(0, str(REPO / "launch"))
from diagnose import em_class_shares  # noqa: E402


def test_em_recovers_the_class_shares_of_a_shifted_pool():
    # A calibrated classifier for two overlapping Gaussians trained on balanced classes (p(y|x) by Bayes with
    # shares 1/2, 1/2), applied to a pool with shares 0.8 / 0.2: EM recovers 0.8 / 0.2, the plain mean of
    # p(y|x) does not (the overlap pulls it towards 1/2).
    rng = np.random.default_rng(0)
    y = (rng.random(200_000) < 0.2).astype(int)
    x = rng.normal(loc=np.where(y == 1, 1.0, -1.0), scale=1.0)
    logit = 2.0 * x  # log N(x; 1, 1) - log N(x; -1, 1)
    p = np.stack([1 / (1 + np.exp(logit)), 1 / (1 + np.exp(-logit))], axis=1)
    share = em_class_shares(p, np.array([0.5, 0.5]), iterations=500)
    np.testing.assert_allclose(share, [0.8, 0.2], atol=0.01)
    assert abs(p.mean(0)[1] - 0.2) > 0.05
    # A pool on which the classifier is undecided everywhere: the labelled shares stay.
    np.testing.assert_allclose(em_class_shares(np.full((10, 2), 0.5), np.array([0.5, 0.5])), [0.5, 0.5])


def test_diagnose_scores_the_run_as_its_validation_pass_did(digits_shards, tmp_path):
    """On a run trained with graph smoothing and one validation pass at its end (best = final weights):
    f(mu) is that pass's softmax f(mu) alone, f(mu)+graph the smoothed figure it was selected by."""
    import json

    from conftest import TINY, run_train
    from diagnose import diagnose

    out = tmp_path / "run"
    run_train(["--config", str(REPO / "configs" / "digits.yaml"), *TINY, f"data.shards={digits_shards}",
               f"train.out_dir={out}", "train.steps=20", "train.eval_every=20", "train.cpu_threads=1",
               "model.graph_smoothing=0.9", "model.graph_pool=300"])
    val = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if "val_accuracy" in line][-1]
    res = diagnose(str(out), "step-000020")
    assert abs(res["f(mu)+graph"] - val["val_accuracy"]) < 1e-6
    assert abs(res["f(mu)"] - val["val_prior_accuracy"]) < 1e-6
