"""Where does a trained model's accuracy come from? Diagnostics of one run on its validation split.

    python launch/diagnose.py runs/screen/magic_gamma/seed0/base [--checkpoint best-002000]

For the run's final (or named) checkpoint and its shards, on the validation split (never test):
    f(mu)          accuracy of the model's own classifier, argmax f(mu(x))
    lr(mu)         a logistic regression on mu(x), fitted on the labelled rows (C by cross-validation on them):
                   if it beats f(mu), the latent space is good and the prior's head is what falls short
    lr(x)          the same logistic regression on the raw (scaled) features: if it beats lr(mu), the latent
                   space makes classes no easier to separate than the input does
    knn(mu), knn(x) leave-one-out 1-nearest-neighbour accuracy among the validation rows themselves, on mu
                   and on x: how well classes cluster in each space (uses validation labels, so a diagnostic,
                   never a way to choose a setting)
    F by class     mean F(mu(x)) = logsumexp f(mu(x)) per true class, and the share of the prior's samples
                   (Langevin chains from noise) that f assigns to each class, beside the classes' shares
    f(mu)+em       f(mu) corrected for the class shares of the unlabelled pool: a class-balanced labelled set
                   teaches f balanced classes; the pool's shares are estimated by EM on softmax f(mu(x))
                   (Saerens et al. 2002; labels unused) and f + log(pool share / labelled share) is scored.
                   If it beats f(mu), the classifier's class prior, not its boundaries, is what falls short
    f(mu)+graph    f(mu) smoothed over a graph of the labelled rows and the pool in mu-space (ssl_ebm/graph.py),
                   with --graph-alpha, else the run's model.graph_smoothing, else 0.9: what graph
                   smoothing would give this run's weights; graph_share: its predicted class counts
    threshold      two-class tables only, on f(mu)+graph's score for class 1 (uses validation labels, so a
                   diagnostic): its AUC, and the accuracy if the threshold gave the true class shares or were
                   the best one. What a class-share correction could at most be worth, against how well the
                   score ranks the classes at all
    inference      other readings of the same weights' p(y|x), accuracy on validation: "mc" the mean of softmax f(z)
                   over 32 draws z ~ q(z|x); "iw" the model's own p(y|x) = E_p(z|x) softmax f(z), by importance
                   sampling with q (weights p(x|z) exp(F(z)) p0(z) / q(z|x)); "map10", "map30" f at z moved from
                   mu by 10 or 30 normalised gradient steps (0.05) up log p(x|z) + F(z) + log p0(z), towards the
                   posterior's mode under the energy prior. If one beats f(mu), the amortised mu is what falls short
    pull           the median over up to 512 unlabelled rows of the gradient norm with respect to mu(x) of
                   each unlabelled term at z = mu: log p(x|z), -KL(q||p0) and F(z), i.e. how hard the
                   reconstruction, the KL and the prior pull the encoder
Prints one JSON line; --json appends it to a file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "launch"))

import baselines as BL  # launch/baselines.py
from ssl_ebm import config as C
from ssl_ebm import data
from ssl_ebm.checkpoint import CheckpointStore, load_weights
from ssl_ebm.graph import GraphMemory, encode
from ssl_ebm.langevin import langevin
from ssl_ebm.model import LatentEBM


def _lr_cv(x_l, y_l, x_v, y_v, seed: int) -> float:
    from sklearn.linear_model import LogisticRegression

    s = SimpleNamespace(x_l=x_l, y_l=y_l, seed=seed)  # the fields of a Splits that cv_accuracy reads
    best = max(BL.LR_C, key=lambda c: BL.cv_accuracy(s, LogisticRegression(C=c, max_iter=2000)))
    return float((LogisticRegression(C=best, max_iter=2000).fit(x_l, y_l).predict(x_v) == y_v).mean())


def _knn_loo(x, y) -> float:
    from sklearn.neighbors import KNeighborsClassifier

    nn = KNeighborsClassifier(n_neighbors=2).fit(x, y)
    idx = nn.kneighbors(x, return_distance=False)[:, 1]  # the nearest other row
    return float((y[idx] == y).mean())


def em_class_shares(p_NK: np.ndarray, labelled_share_K: np.ndarray, iterations: int = 100) -> np.ndarray:
    """The class shares of a pool by EM, from a classifier's p(y|x) trained where classes had labelled_share_K:
    reweight each p(y|x) by share / labelled share, renormalise, average; repeat (Saerens et al. 2002)."""
    share = labelled_share_K.copy()
    for _ in range(iterations):
        q_NK = p_NK * (share / labelled_share_K)
        share = (q_NK / q_NK.sum(1, keepdims=True)).mean(0)
    return share


def graph_proba(net, cfg, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """f(mu) smoothed over the graph training's evaluation would build (same rows), on the validation split:
    (q (V, K), labels (V,))."""
    url = cfg.data.shards
    qs, ys = [], []
    with torch.no_grad():
        memory = GraphMemory.from_shards(net, url, cfg, alpha=alpha)
        for b in data.eval_batches(url, "val", batch_size=cfg.data.eval_batch):
            qs.append(memory.proba(*encode(net, b["x"])).numpy()), ys.append(b["y"].numpy())
    return np.concatenate(qs), np.concatenate(ys)


def threshold_figures(score: np.ndarray, y: np.ndarray) -> dict:
    """A two-class score for class 1 against the labels: its AUC, and the accuracy at 0.5, at the threshold that
    calls the lowest-scoring rows class 0 in their true number (rows tied there split in score order), and at the
    best threshold."""
    from sklearn.metrics import roc_auc_score

    pos = y == 1
    order = np.argsort(score, kind="stable")
    s_sorted, pos_sorted = score[order], pos[order]
    # Accuracy with the first i sorted rows called class 0 (i = 0..V): the class-0 rows among them plus the
    # class-1 rows after them; a cut can only fall where the score changes (or at either end).
    zeros_before = np.r_[0, np.cumsum(~pos_sorted)]
    ones_after = pos.sum() - np.r_[0, np.cumsum(pos_sorted)]
    acc = (zeros_before + ones_after) / len(y)
    cut_ok = np.r_[True, s_sorted[1:] != s_sorted[:-1], True]
    n0 = int((~pos).sum())
    return {"auc": round(float(roc_auc_score(pos, score)), 4), "at_0.5": float(((score > 0.5) == pos).mean()),
            "at_true_share": float(acc[n0]), "best": float(acc[cut_ok].max())}


def inference_figures(net, x: torch.Tensor, y: torch.Tensor, samples: int = 32, seed: int = 0) -> dict:
    """Validation accuracy of f at other readings of z than mu (see "inference" above)."""
    gen = torch.Generator().manual_seed(seed)
    sigma0 = net.cfg.sigma0
    acc = lambda logits: float((logits.argmax(-1) == y).float().mean())  # noqa: E731
    with torch.no_grad():
        mu, logvar = (t.float() for t in net.encoder(x))
        std = torch.exp(0.5 * logvar)
        probs, log_w = [], []
        for _ in range(samples):
            u = torch.randn(mu.shape, generator=gen)
            z = mu + std * u
            logits = net.prior(z)
            probs.append(torch.softmax(logits, -1))
            log_q = (-0.5 * u.pow(2) - 0.5 * logvar).sum(1)  # log q(z|x) up to the constant log p0 shares
            log_w.append(net.log_px(x, z) + torch.logsumexp(logits, -1) - 0.5 * (z / sigma0).pow(2).sum(1) - log_q)
        P_SBK, w_SB = torch.stack(probs), torch.softmax(torch.stack(log_w), 0)
    out = {"mc": acc(P_SBK.mean(0)), "iw": acc((w_SB[..., None] * P_SBK).sum(0))}
    z = mu.clone().requires_grad_(True)
    for step in range(1, 31):
        objective = net.log_px(x, z) + net.prior.free_energy(z) - 0.5 * (z / sigma0).pow(2).sum(1)
        grad, = torch.autograd.grad(objective.sum(), z)
        with torch.no_grad():
            z += 0.05 * grad / grad.norm(dim=1, keepdim=True).clamp_min(1.0)
            if step in (10, 30):
                out[f"map{step}"] = acc(net.prior(z))
    return out


def pulls(net, x_u: torch.Tensor) -> dict:
    """Median over the rows of x_u of |d term / d mu| at z = mu for log p(x|z), -KL(q(z|x) || p0) and F(z)."""
    from ssl_ebm.likelihood import kl_to_p0

    mu, logvar = net.encoder(x_u)
    mu = mu.detach().float().requires_grad_(True)
    terms = {"recon": net.log_px(x_u, mu).sum(), "kl": -kl_to_p0(mu, logvar.detach().float(), net.cfg.sigma0).sum(),
             "F": net.prior.free_energy(mu).sum()}
    out = {}
    for name, term in terms.items():
        grad, = torch.autograd.grad(term, mu, retain_graph=True)
        out[name] = round(grad.norm(dim=1).median().item(), 4)
    return out


def diagnose(run: str, checkpoint: str = "", seed: int = 0, graph_alpha: float | None = None) -> dict:
    cfg = C.from_dict(C.Config, yaml.safe_load(Path(run, "config.yaml").read_text()))
    store = CheckpointStore(f"{run}/checkpoints")
    name = checkpoint or store.latest("step")  # the newest complete step-* checkpoint: the final weights
    net = LatentEBM(cfg.model)
    net.load_state_dict(load_weights(f"{run}/checkpoints/{name}"))
    net.eval()
    url = cfg.data.shards
    x_l, y_l = BL.read_split(url, "labelled")
    x_v, y_v = BL.read_split(url, "val")
    x_u, _ = BL.read_split(url, "unlabelled")  # its labels are not used
    K = cfg.model.num_classes
    as_input = lambda x: torch.from_numpy(x).float().reshape(len(x), *cfg.model.x_shape)  # noqa: E731 - images too
    with torch.no_grad():
        p_u = np.concatenate([torch.softmax(net.predict_logits(as_input(x)).double(), -1).numpy()
                              for x in np.array_split(x_u, max(1, len(x_u) // 4096))])  # a pool of images fits too
        mu_l = net.encoder(as_input(x_l))[0].numpy()
        mu_v_t = net.encoder(as_input(x_v))[0]
        logits_v = net.prior(mu_v_t)
        F_v = torch.logsumexp(logits_v, -1).numpy()
        mu_v = mu_v_t.numpy()
    labelled_share = np.maximum(np.bincount(y_l, minlength=K) / len(y_l), 1e-6)
    pool_share = em_class_shares(p_u, labelled_share)
    em_logits = logits_v.double().numpy() + np.log(np.maximum(pool_share, 1e-12)) - np.log(labelled_share)
    torch.manual_seed(seed)
    z = torch.randn(2000, cfg.model.z_dim) * cfg.model.sigma0
    z = langevin(net.prior, z, steps=200, step_size=cfg.sampler.step_size, sigma0=cfg.model.sigma0)
    with torch.no_grad():
        chain_class = net.prior(z).argmax(-1).numpy()
    alpha = graph_alpha or cfg.model.graph_smoothing or 0.9
    q_v, y_q = graph_proba(net, cfg, alpha)
    extra = {"threshold": threshold_figures(q_v[:, 1], y_q)} if K == 2 else {}
    return {"run": run, "checkpoint": name,
            "f(mu)": float((logits_v.argmax(-1).numpy() == y_v).mean()),
            "f(mu)+em": float((em_logits.argmax(-1) == y_v).mean()), "em_share": pool_share.round(4).tolist(),
            "f(mu)+graph": float((q_v.argmax(1) == y_q).mean()), "graph_alpha": alpha,
            "graph_share": np.bincount(q_v.argmax(1), minlength=K).tolist(),
            "lr(mu)": _lr_cv(mu_l, y_l, mu_v, y_v, seed), "lr(x)": _lr_cv(x_l, y_l, x_v, y_v, seed),
            "knn(mu)": _knn_loo(mu_v, y_v), "knn(x)": _knn_loo(x_v, y_v),
            "F_by_class": [round(float(F_v[y_v == k].mean()), 3) for k in range(K) if (y_v == k).any()],
            "chain_share": np.bincount(chain_class, minlength=K).round(0).tolist(),
            "class_share": np.bincount(y_v, minlength=K).tolist(),
            "predicted_share": np.bincount(logits_v.argmax(-1).numpy(), minlength=K).tolist(), **extra,
            "inference": inference_figures(net, as_input(x_v), torch.from_numpy(y_v), seed=seed),
            "pull": pulls(net, as_input(x_u[:512]))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("runs", nargs="+", help="run folders (train.out_dir)")
    p.add_argument("--checkpoint", default="", help="checkpoint name (default: the newest complete one)")
    p.add_argument("--json", default="", help="append each result line to this file")
    p.add_argument("--graph-alpha", type=float, default=None,
                   help="f(mu)+graph's spreading weight (default: the run's model.graph_smoothing, else 0.9)")
    a = p.parse_args(argv)
    for run in a.runs:
        try:
            out = diagnose(run.rstrip("/"), a.checkpoint, graph_alpha=a.graph_alpha)
        except (data.DataError, C.ConfigError, OSError) as e:
            print(f"error: {run}: {e}", file=sys.stderr)
            return 2
        line = json.dumps(out)
        print(line, flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
