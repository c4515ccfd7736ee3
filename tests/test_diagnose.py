"""launch/diagnose.py: the EM estimate of a pool's class shares (Saerens et al. 2002), the two-class threshold
figures, and a diagnosis of a trained run."""

from __future__ import annotations

import sys

import numpy as np
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "launch"))
from diagnose import em_class_shares, threshold_figures  # noqa: E402


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


def test_threshold_figures():
    # Scores that separate the classes perfectly but all lie above 0.5: the 0.5 threshold calls every row class 1
    # (accuracy = class 1's share); the true shares' threshold and the best one are right everywhere.
    rng = np.random.default_rng(0)
    y = (rng.random(1000) < 0.3).astype(int)
    score = np.where(y == 1, 0.9, 0.7) + rng.normal(0, 0.01, 1000)
    fig = threshold_figures(score, y)
    assert fig["auc"] == 1.0 and fig["at_true_share"] == fig["best"] == 1.0
    assert fig["at_0.5"] == y.mean()
    assert threshold_figures(-score, y)["auc"] == 0.0  # a score that ranks the classes backwards
    # Overlapping classes: the best threshold is at least as good as any other, 0.5 and the true shares' included.
    noisy = score + rng.normal(0, 0.1, 1000)
    fig = threshold_figures(noisy, y)
    assert 0.5 < fig["auc"] < 1 and fig["best"] >= max(fig["at_0.5"], fig["at_true_share"])
    assert fig["best"] == max(((noisy > c) == y).mean() for c in np.r_[-np.inf, noisy])  # every cut, by brute force
    # One score for every row: no threshold separates anything; the best is to call every row the larger class.
    flat = threshold_figures(np.full(1000, 0.5), y)
    assert flat["auc"] == 0.5 and flat["best"] == max(y.mean(), 1 - y.mean())


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
    assert sum(res["graph_share"]) == sum(res["class_share"]) and len(res["graph_share"]) == 10
    assert "threshold" not in res  # ten classes: the two-class figures are left out
    assert set(res["inference"]) == {"mc", "iw", "map10", "map30"}
    assert all(0 <= v <= 1 for v in res["inference"].values())
    assert set(res["pull"]) == {"recon", "kl", "F"} and all(0 < v < float("inf") for v in res["pull"].values())


def test_inference_figures_agree_with_f_mu_when_the_posterior_is_a_point():
    """With q(z|x)'s std near 0 every draw is mu: the mean of softmax f(z) and its importance-weighted mean both
    classify as f(mu) does; a step of 0 length leaves the MAP readings there too."""
    from diagnose import inference_figures
    from pairings import tiny_config

    from ssl_ebm.model import LatentEBM

    class PointPosterior(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, x):
            mu, logvar = self.encoder(x)
            return mu, torch.full_like(logvar, -40.0)

    torch.manual_seed(0)
    net = LatentEBM(tiny_config("mlp+mlp gaussian")).eval()
    net.encoder = PointPosterior(net.encoder)
    x = torch.randn(64, *net.cfg.x_shape)
    y = torch.randint(0, net.cfg.num_classes, (64,))
    with torch.no_grad():
        f_mu = float((net.predict_logits(x).argmax(-1) == y).float().mean())
    out = inference_figures(net, x, y, samples=4)
    assert out["mc"] == out["iw"] == f_mu
    assert set(out) == {"mc", "iw", "map10", "map30"} and all(0 <= v <= 1 for v in out.values())
