"""Baselines on the same shards as ours: each on the same labelled examples, its settings chosen on validation.

    python launch/baselines.py --config configs/magic_gamma.yaml --shards runs/reproduce/magic_gamma/seed0/shards \
        --method vat [--seed 0] [--out vat.json] [section.key=value ...]

Methods (test accuracy of the setting, and for the networks the checkpoint, best on the validation split):
    lr             logistic regression on the labelled rows alone, C from a grid
    rf             random forest on the labelled rows alone, max_features x min_samples_leaf from a grid
    gb             gradient boosting (HistGradientBoostingClassifier) on the labelled rows, learning rate x
                   leaf size from a grid
    self_training  scikit-learn SelfTrainingClassifier around the better of lr / rf on validation (with its
                   chosen settings), over labelled + (subsampled) unlabelled rows, threshold from a grid
    vat            virtual adversarial training: cross-entropy + KL(p(y|x) || p(y|x + r_adv)) on all rows,
                   one power iteration, (xi, eps) from a grid; `--entmin` adds entropy minimisation
    pi             the Pi-model: cross-entropy + w(t) * squared softmax difference of two noisy passes
                   (input noise + dropout), w ramped up over the first quarter, (w, noise) from a grid
vat and pi train the config's encoder with the prior MLP f as the head (ssl_ebm.baselines.Classifier),
Adam at optim.lr_encoder with optim.betas, the config's batch sizes and train.steps updates (as ours),
evaluated on validation every train.eval_every steps. Feature preparation for the scikit-learn methods:
vectors as stored (standardised), images flattened, word counts log(1 + count) at unit length.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssl_ebm import baselines as B
from ssl_ebm import config as C
from ssl_ebm import data
from ssl_ebm.metrics import evaluate

SKLEARN = ("lr", "rf", "gb", "self_training")
NEURAL = ("vat", "pi")
NAMES = {"supervised": "supervised only", "label_spreading": "RBF label spreading", "lr": "logistic regression",
         "rf": "random forest", "gb": "gradient boosting", "self_training": "self-training", "vat": "VAT",
         "pi": "Π-model"}
LR_C = (0.01, 0.1, 1.0, 10.0, 100.0)
RF_GRID = [(mf, leaf) for mf in ("sqrt", 0.5, 1.0) for leaf in (1, 3)]
GB_GRID = [(lr, leaf) for lr in (0.03, 0.1, 0.3) for leaf in (2, 5)]
SELF_TRAINING_THRESHOLDS = (0.7, 0.8, 0.9, 0.95)
VAT_GRID = [(xi, eps) for xi in (1e-6, 0.1) for eps in (0.1, 0.3, 1.0)]  # eps times sqrt(D): per-feature RMS
PI_GRID = [(w, noise) for w in (1.0, 10.0, 100.0) for noise in (0.15, 0.5)]
PI_DROPOUT = 0.2  # on mu(x) before the head


# ----------------------------------------------------------------------------- features for scikit-learn


def read_split(url: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All of a split as (x flattened float64-ready, y)."""
    xs, ys = [], []
    for b in data.eval_batches(url, split, batch_size=2048):
        xs.append(b["x"].flatten(1).numpy())
        ys.append(b["y"].numpy())
    return np.concatenate(xs), np.concatenate(ys)


def prepare(manifest: dict, x: np.ndarray) -> np.ndarray:
    """Word counts: log(1 + count) at unit length (a cosine-like geometry); other kinds as they are."""
    if manifest["kind"] == "counts":
        x = np.log1p(x)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


class Splits:
    """The shards' labelled, unlabelled (subsampled to max_unlabelled), val and test rows, prepared once."""

    def __init__(self, url: str, seed: int, max_unlabelled: int = 4000):
        self.url, self.manifest = url, data.read_manifest(url)
        counts = {s: self.manifest["splits"].get(s, {}).get("count", 0) for s in data.SPLITS}
        if not counts["val"]:
            raise data.DataError(f"shards at {url} have no validation split: the baselines choose their "
                                 "settings on it; rebuild the shards with a validation part")
        self.x_l, self.y_l = read_split(url, "labelled")
        x_u, _ = read_split(url, "unlabelled") if counts["unlabelled"] else (self.x_l[:0], self.y_l[:0])
        self.unlabelled_pool = len(x_u)
        rng = np.random.default_rng(seed)
        if len(x_u) > max_unlabelled:
            x_u = x_u[rng.choice(len(x_u), max_unlabelled, replace=False)]
        self.x_u = x_u
        self.x_v, self.y_v = read_split(url, "val")
        self.x_t, self.y_t = read_split(url, "test") if counts["test"] else (None, None)
        self.x_l, self.x_u, self.x_v = (prepare(self.manifest, a) for a in (self.x_l, self.x_u, self.x_v))
        if self.x_t is not None:
            self.x_t = prepare(self.manifest, self.x_t)


def _score(model, x, y) -> float:
    return float((model.predict(x) == y).mean())


def _choose(s: Splits, candidates: list[tuple[dict, object]]) -> dict:
    """Fit every (settings, unfitted model) on the labelled rows; keep the best on validation; test it."""
    best = None
    tried = []
    for settings, model in candidates:
        with warnings.catch_warnings():  # convergence and tiny-class warnings: the validation score judges
            warnings.simplefilter("ignore")
            model.fit(s.x_l, s.y_l)
        val = _score(model, s.x_v, s.y_v)
        tried.append({**settings, "val_accuracy": val})
        if best is None or val > best[0]:
            best = (val, settings, model)
    val, settings, model = best
    out = {"val_accuracy": val, "settings": settings, "candidates": tried}
    if s.x_t is not None:
        out["test_accuracy"] = _score(model, s.x_t, s.y_t)
    out["_model"] = model
    return out


def logistic_regression(s: Splits, seed: int) -> dict:
    from sklearn.linear_model import LogisticRegression

    return _choose(s, [({"C": c}, LogisticRegression(C=c, max_iter=2000)) for c in LR_C])


def random_forest(s: Splits, seed: int) -> dict:
    from sklearn.ensemble import RandomForestClassifier

    return _choose(s, [({"max_features": mf, "min_samples_leaf": leaf},
                        RandomForestClassifier(n_estimators=300, max_features=mf, min_samples_leaf=leaf,
                                               random_state=seed, n_jobs=1)) for mf, leaf in RF_GRID])


def gradient_boosting(s: Splits, seed: int) -> dict:
    from sklearn.ensemble import HistGradientBoostingClassifier

    return _choose(s, [({"learning_rate": lr, "min_samples_leaf": leaf},
                        HistGradientBoostingClassifier(learning_rate=lr, min_samples_leaf=leaf, max_iter=200,
                                                       early_stopping=False, random_state=seed))
                       for lr, leaf in GB_GRID])


def self_training(s: Splits, seed: int, bases: dict | None = None) -> dict:
    """SelfTrainingClassifier around the better of lr / rf on validation (their results in `bases`)."""
    from sklearn.base import clone
    from sklearn.semi_supervised import SelfTrainingClassifier

    bases = bases or {}
    for name, fn in (("lr", logistic_regression), ("rf", random_forest)):
        if name not in bases:
            bases[name] = fn(s, seed)
    base_name = max(("lr", "rf"), key=lambda n: bases[n]["val_accuracy"])
    base = bases[base_name]["_model"]
    x = np.concatenate([s.x_l, s.x_u])
    y = np.concatenate([s.y_l, -np.ones(len(s.x_u), np.int64)])
    best, tried = None, []
    for threshold in SELF_TRAINING_THRESHOLDS:
        model = SelfTrainingClassifier(clone(base), threshold=threshold, max_iter=10)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(x, y)
        val = _score(model, s.x_v, s.y_v)
        tried.append({"threshold": threshold, "val_accuracy": val})
        if best is None or val > best[0]:
            best = (val, threshold, model)
    val, threshold, model = best
    out = {"val_accuracy": val, "settings": {"base": base_name, **bases[base_name]["settings"],
                                             "threshold": threshold}, "candidates": tried,
           "unlabelled_used": len(s.x_u), "unlabelled_pool": s.unlabelled_pool}
    if s.x_t is not None:
        out["test_accuracy"] = _score(model, s.x_t, s.y_t)
    return out


def sklearn_baselines(url: str, names: list[str], seed: int, max_unlabelled: int = 4000) -> dict:
    """{name: result} for the scikit-learn methods in `names` on one shard directory."""
    s = Splits(url, seed, max_unlabelled)
    fns = {"lr": logistic_regression, "rf": random_forest, "gb": gradient_boosting}
    out: dict = {}
    for name in names:
        t0 = time.time()
        out[name] = self_training(s, seed, out) if name == "self_training" else fns[name](s, seed)
        out[name]["seconds"] = round(time.time() - t0, 1)
    return {n: {k: v for k, v in r.items() if k != "_model"} for n, r in out.items() if n in names}


# ----------------------------------------------------------------------------- VAT and the Pi-model


def model_config(cfg: C.Config, manifest: dict) -> C.ModelConfig:
    """The config's model with the data's shape and class count."""
    return replace(cfg.model, x_shape=tuple(manifest["x_shape"]), num_classes=int(manifest["num_classes"]))


def train_neural(method: str, cfg: C.Config, url: str, seed: int, settings: dict) -> dict:
    """One VAT or Pi-model run with fixed settings; the weights best on validation, tested."""
    manifest = data.read_manifest(url)
    mcfg = model_config(cfg, manifest)
    torch.manual_seed(seed)
    if method == "pi":
        model = B.Classifier(mcfg, input_noise=settings["noise"], dropout=PI_DROPOUT)
    else:
        model = B.Classifier(mcfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr_encoder, betas=cfg.optim.betas,
                           weight_decay=cfg.optim.weight_decay)
    steps, every = cfg.train.steps, cfg.train.eval_every or max(1, cfg.train.steps // 10)
    sqrt_d = math.sqrt(math.prod(mcfg.x_shape))
    stream = data.train_batches(url, batch_unlabelled=cfg.data.batch_unlabelled, batch_labelled=cfg.data.batch_labelled,
                                seed=seed, shuffle_buffer=cfg.data.shuffle_buffer, num_workers=cfg.data.workers,
                                cache_mb=cfg.data.cache_mb)

    def val_accuracy() -> float:
        model.eval()
        out = evaluate(model, data.eval_batches(url, "val", batch_size=cfg.data.eval_batch), mcfg.num_classes, "cpu")
        model.train()
        return out["accuracy"]

    best = (-1.0, 0, None)
    model.train()
    for step in range(1, steps + 1):
        batch = next(stream)
        x_l, y_l = batch["x_l"], batch["y_l"]
        x_all = torch.cat([batch["x_u"], x_l])
        if method == "vat":
            logits = model(x_all)
            ce = F.cross_entropy(logits[len(batch["x_u"]):], y_l)
            unsup = B.vat_loss(model, x_all, settings["xi"], settings["eps"] * sqrt_d, logits_BK=logits)
            if settings.get("entmin", 0.0):
                unsup = unsup + settings["entmin"] * B.entropy_loss(logits)
            loss = ce + unsup
        else:
            logits_a, logits_b = model(x_all), model(x_all)
            ce = F.cross_entropy(logits_a[len(batch["x_u"]):], y_l)
            loss = ce + settings["w"] * B.rampup(step, steps // 4) * B.pi_loss(logits_a, logits_b)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{method} with {settings}: non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            acc = val_accuracy()
            if acc > best[0]:
                best = (acc, step, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    model.eval()
    out = {"val_accuracy": best[0], "best_step": best[1], "settings": settings}
    if manifest["splits"].get("test", {}).get("count", 0):
        test = evaluate(model, data.eval_batches(url, "test", batch_size=cfg.data.eval_batch), mcfg.num_classes, "cpu")
        out.update(test_accuracy=test["accuracy"], test_macro_f1=test["macro_f1"])
    return out


def settings_from(path: str, method: str) -> dict:
    """The setting an earlier result of `method` chose on its validation split (its "settings")."""
    try:
        earlier = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise C.ConfigError(f"--settings-from {path}: cannot read it as a baselines result JSON ({e})") from None
    if earlier.get("method") != method or not isinstance(earlier.get("settings"), dict):
        raise C.ConfigError(f"--settings-from {path}: not a {method} result with chosen settings "
                            f"(method {earlier.get('method')!r}); pass the --out JSON of a --method {method} run")
    return earlier["settings"]


def neural_baseline(method: str, cfg: C.Config, url: str, seed: int, entmin: float = 0.0,
                    settings: dict | None = None) -> dict:
    """The grid of `method` (or only `settings`, chosen elsewhere), each run to cfg.train.steps; the run best
    on validation."""
    if method not in NEURAL:
        raise ValueError(f"unknown method {method!r}; neural baselines: {', '.join(NEURAL)}")
    if settings is not None:
        grid = [settings]
    elif method == "vat":
        grid = [{"xi": xi, "eps": eps, "entmin": entmin} for xi, eps in VAT_GRID]
    else:
        grid = [{"w": w, "noise": noise, "dropout": PI_DROPOUT} for w, noise in PI_GRID]
    t0 = time.time()
    runs = [train_neural(method, cfg, url, seed, settings) for settings in grid]
    best = max(runs, key=lambda r: r["val_accuracy"])
    return {**best, "candidates": [{**r["settings"], "val_accuracy": r["val_accuracy"],
                                    "best_step": r["best_step"]} for r in runs],
            "steps": cfg.train.steps, "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", required=True, help="YAML config file (its model, data batch sizes, optim, steps)")
    p.add_argument("--shards", required=True, help="shard directory URL (holding manifest.json)")
    p.add_argument("--method", required=True, choices=[*SKLEARN, *NEURAL])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--entmin", type=float, default=0.0, help="vat: weight of entropy minimisation (default 0)")
    p.add_argument("--max-unlabelled", type=int, default=4000, help="self_training: unlabelled rows it sees")
    p.add_argument("--out", default="", help="also write the result as JSON here")
    p.add_argument("--settings-from", default="", help="vat / pi: skip the grid and run only the setting this "
                   "earlier --out JSON of the same method chose on its validation split (e.g. another seed's)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.steps=1000")
    a = p.parse_args(argv)
    try:
        cfg = C.load_config(a.config, a.overrides)
        if cfg.train.cpu_threads and not torch.cuda.is_available():
            torch.set_num_threads(cfg.train.cpu_threads)
        if a.method in NEURAL:
            chosen = settings_from(a.settings_from, a.method) if a.settings_from else None
            result = neural_baseline(a.method, cfg, a.shards, a.seed, a.entmin, chosen)
            if a.settings_from:
                result["settings_from"] = a.settings_from
        elif a.settings_from:
            raise C.ConfigError(f"--settings-from is for the network baselines ({', '.join(NEURAL)}), "
                                f"not --method {a.method}")
        else:
            result = sklearn_baselines(a.shards, [a.method], a.seed, a.max_unlabelled)[a.method]
    except (C.ConfigError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    text = json.dumps({"method": a.method, "shards": a.shards, "seed": a.seed, **result}, indent=1)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text if not a.out else f"{a.method}: val {result['val_accuracy']:.4f}, test "
          f"{result.get('test_accuracy', float('nan')):.4f}; wrote {a.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
