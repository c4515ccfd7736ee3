"""Baselines on the same shards as ours, on the same labelled examples, under one of two protocols.

    python launch/baselines.py --config configs/magic_gamma.yaml --shards runs/reproduce/magic_gamma/seed0/shards \
        --method vat [--protocol realistic] [--seed 0] [--out vat.json] [section.key=value ...]

The protocol (ssl_ebm/protocol.py) says what chooses each method's settings and, for the networks, its weights:
    realistic   the labelled rows only: the scikit-learn methods pick from their grid by stratified k-fold
                cross-validation on the labelled rows and are refitted on all of them; VAT and the Pi-model run
                their fixed setting (FIXED) and are tested with the weights at the end of training. The
                validation split is never read.
    oracle-val  the validation split picks the setting from the grid, and the networks' checkpoint.
Methods:
    lr              logistic regression on the labelled rows alone, C from a grid
    rf              random forest on the labelled rows alone, max_features x min_samples_leaf from a grid
    gb              gradient boosting (HistGradientBoostingClassifier) on the labelled rows, learning rate x
                    leaf size from a grid
    self_training   scikit-learn SelfTrainingClassifier around the better of lr / rf (with its chosen
                    settings), over labelled + (subsampled) unlabelled rows, threshold from a grid
    label_spreading LabelSpreading(kernel="rbf") on labelled + (subsampled) unlabelled rows, gamma from a grid
                    around 1 / median squared distance (transductive: in cross-validation the held-out labelled
                    rows join the unlabelled ones)
    vat             virtual adversarial training: cross-entropy + weight * KL(p(y|x) || p(y|x + r_adv)) on all
                    rows, one power iteration; `--entmin` adds entropy minimisation
    pi              the Pi-model: cross-entropy + w(t) * squared softmax difference of two noisy passes
                    (input noise + dropout), w ramped up over the first quarter
vat and pi train the config's encoder with the prior MLP f as the head (ssl_ebm.baselines.Classifier),
Adam at optim.lr_encoder with optim.betas, the config's batch sizes and train.steps updates (as ours).
Feature preparation for the scikit-learn methods: vectors as stored (scaled as the shards were built),
images flattened, word counts log(1 + count) at unit length.
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
from ssl_ebm import protocol as P
from ssl_ebm import config as C
from ssl_ebm import data
from ssl_ebm.metrics import evaluate

SKLEARN = ("lr", "rf", "gb", "self_training", "label_spreading")
NEURAL = ("vat", "pi")
NAMES = {"supervised": "supervised only", "label_spreading": "RBF label spreading", "lr": "logistic regression",
         "rf": "random forest", "gb": "gradient boosting", "self_training": "self-training", "vat": "VAT",
         "pi": "Π-model"}
LR_C = (0.01, 0.1, 1.0, 10.0, 100.0)
RF_GRID = [(mf, leaf) for mf in ("sqrt", 0.5, 1.0) for leaf in (1, 3)]
GB_GRID = [(lr, leaf) for lr in (0.1, 0.3) for leaf in (2, 5)]
SELF_TRAINING_THRESHOLDS = (0.7, 0.8, 0.9, 0.95)
# Sizes that keep a seed's scikit-learn methods to seconds when every grid point is cross-validated five ways
# (300 trees and 200 boosting iterations made gradient boosting alone take minutes per seed on 10 classes).
RF_TREES, GB_ITERATIONS = 100, 100
LS_GAMMA_SCALES = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)  # times 1 / median squared distance
# VAT: eps times sqrt(D) (a per-feature RMS); its term's weight against the cross-entropy is part of the grid
VAT_GRID = [(xi, eps, w) for xi in (1e-6, 0.1) for eps in (0.1, 0.3, 1.0) for w in (1.0, 3.0)]
PI_GRID = [(w, noise) for w in (1.0, 10.0, 100.0) for noise in (0.15, 0.5)]
PI_DROPOUT = 0.2  # on mu(x) before the head
# The realistic protocol's fixed settings: the grid point the validation splits of the oracle-val rows chose
# most often (VAT: 8 of 12 rows on MNIST, Fashion-MNIST and the five first tables; Pi-model: 7 of 12). No
# labels of the row being measured choose them.
FIXED = {"vat": {"xi": 0.1, "eps": 0.1, "weight": 1.0, "entmin": 0.0},
         "pi": {"w": 100.0, "noise": 0.15, "dropout": PI_DROPOUT}}


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
    """The shards' labelled, unlabelled (subsampled to max_unlabelled), val and test rows, prepared once.
    Under the realistic protocol the validation split is not read (x_v and y_v are None)."""

    def __init__(self, url: str, seed: int, max_unlabelled: int = 4000, protocol: str = "oracle-val"):
        self.url, self.manifest, self.seed = url, data.read_manifest(url), seed
        counts = {s: self.manifest["splits"].get(s, {}).get("count", 0) for s in data.SPLITS}
        self.use_val = P.reads_validation(protocol)
        if self.use_val and not counts["val"]:
            raise data.DataError(f"shards at {url} have no validation split, which the oracle-val protocol chooses "
                                 "settings on; use --protocol realistic, or rebuild the shards with a validation part")
        self.x_l, self.y_l = read_split(url, "labelled")
        x_u, _ = read_split(url, "unlabelled") if counts["unlabelled"] else (self.x_l[:0], self.y_l[:0])
        self.unlabelled_pool = len(x_u)
        rng = np.random.default_rng(seed)
        if len(x_u) > max_unlabelled:
            x_u = x_u[rng.choice(len(x_u), max_unlabelled, replace=False)]
        self.x_u = x_u
        self.x_v, self.y_v = read_split(url, "val") if self.use_val else (None, None)
        self.x_t, self.y_t = read_split(url, "test") if counts["test"] else (None, None)
        self.x_l, self.x_u = prepare(self.manifest, self.x_l), prepare(self.manifest, self.x_u)
        self.x_v = prepare(self.manifest, self.x_v) if self.x_v is not None else None
        self.x_t = prepare(self.manifest, self.x_t) if self.x_t is not None else None


def _score(model, x, y) -> float:
    return float((model.predict(x) == y).mean())


def fit_labelled(model, s: Splits, x, y, held_out):
    """An inductive method: the labelled rows alone."""
    return model.fit(x, y)


def fit_with_unlabelled(model, s: Splits, x, y, held_out):
    """A semi-supervised method: the labelled rows, then the unlabelled pool (plus held-out labelled rows, whose
    labels it must not see) marked -1."""
    x_all = np.concatenate([x, s.x_u, held_out])
    y_all = np.concatenate([y, -np.ones(len(s.x_u) + len(held_out), np.int64)])
    return model.fit(x_all, y_all)


def cv_accuracy(s: Splits, model, fit=fit_labelled) -> float:
    """Stratified k-fold accuracy on the labelled rows (ssl_ebm.protocol.cv_folds): each fold held out once."""
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold

    folds = StratifiedKFold(P.cv_folds(s.y_l), shuffle=True, random_state=s.seed)
    right = 0
    for train, held in folds.split(s.x_l, s.y_l):
        fitted = fit(clone(model), s, s.x_l[train], s.y_l[train], s.x_l[held])
        right += int((fitted.predict(s.x_l[held]) == s.y_l[held]).sum())
    return right / len(s.y_l)


def _choose(s: Splits, candidates: list[tuple[dict, object]], fit=fit_labelled) -> dict:
    """Score every (settings, unfitted model) on validation (oracle-val) or by cross-validation on the labelled
    rows (realistic); fit the best on all labelled rows (first on ties) and test it."""
    from sklearn.base import clone

    key = "val_accuracy" if s.use_val else "cv_accuracy"
    best, tried = None, []
    for settings, model in candidates:
        with warnings.catch_warnings():  # convergence, tiny-class and 0/0 warnings: the held-out score judges
            warnings.simplefilter("ignore")
            if s.use_val:
                fitted = fit(model, s, s.x_l, s.y_l, s.x_l[:0])
                score = _score(fitted, s.x_v, s.y_v)
            else:
                fitted, score = None, cv_accuracy(s, model, fit) if len(candidates) > 1 else None
        tried.append({**settings, key: score})
        if best is None or score > best[0]:
            best = (score, settings, model, fitted)
    score, settings, model, fitted = best
    if fitted is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fitted = fit(clone(model), s, s.x_l, s.y_l, s.x_l[:0])
    out = {key: score, "settings": settings, "candidates": tried,
           "budget": P.sklearn_budget("oracle-val" if s.use_val else "realistic", len(candidates)).record()}
    if s.x_t is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["test_accuracy"] = _score(fitted, s.x_t, s.y_t)
    out["_model"] = fitted
    return out


def logistic_regression(s: Splits, seed: int) -> dict:
    from sklearn.linear_model import LogisticRegression

    return _choose(s, [({"C": c}, LogisticRegression(C=c, max_iter=2000)) for c in LR_C])


def random_forest(s: Splits, seed: int) -> dict:
    from sklearn.ensemble import RandomForestClassifier

    return _choose(s, [({"max_features": mf, "min_samples_leaf": leaf},
                        RandomForestClassifier(n_estimators=RF_TREES, max_features=mf, min_samples_leaf=leaf,
                                               random_state=seed, n_jobs=1)) for mf, leaf in RF_GRID])


def gradient_boosting(s: Splits, seed: int) -> dict:
    from sklearn.ensemble import HistGradientBoostingClassifier

    return _choose(s, [({"learning_rate": lr, "min_samples_leaf": leaf},
                        HistGradientBoostingClassifier(learning_rate=lr, min_samples_leaf=leaf, max_iter=GB_ITERATIONS,
                                                       early_stopping=False, random_state=seed))
                       for lr, leaf in GB_GRID])


def self_training(s: Splits, seed: int, bases: dict | None = None) -> dict:
    """SelfTrainingClassifier around the better of lr / rf (their results in `bases`), threshold from a grid."""
    from sklearn.base import clone
    from sklearn.semi_supervised import SelfTrainingClassifier

    bases = bases or {}
    for name, fn in (("lr", logistic_regression), ("rf", random_forest)):
        if name not in bases:
            bases[name] = fn(s, seed)
    key = "val_accuracy" if s.use_val else "cv_accuracy"
    base_name = max(("lr", "rf"), key=lambda n: bases[n][key])
    base = bases[base_name]["_model"]
    out = _choose(s, [({"threshold": t}, SelfTrainingClassifier(clone(base), threshold=t, max_iter=10))
                      for t in SELF_TRAINING_THRESHOLDS], fit=fit_with_unlabelled)
    out["settings"] = {"base": base_name, **bases[base_name]["settings"], **out["settings"]}
    return {**out, "unlabelled_used": len(s.x_u), "unlabelled_pool": s.unlabelled_pool}


def label_spreading(s: Splits, seed: int) -> dict:
    """RBF label spreading over labelled + unlabelled rows; gamma scales 1 / the median squared distance of a
    subsample of all rows (no labels involved)."""
    from sklearn.semi_supervised import LabelSpreading

    x = np.concatenate([s.x_l, s.x_u]).astype(np.float64)
    sub = x[np.random.default_rng(seed).choice(len(x), min(len(x), 1000), replace=False)]
    sq = (sub**2).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * sub @ sub.T, 0.0)  # (n, n), without an (n, n, D) array
    median = max(float(np.median(d2[np.triu_indices(len(sub), 1)])), 1e-12)
    out = _choose(s, [({"gamma": scale / median}, LabelSpreading(kernel="rbf", gamma=scale / median, max_iter=100))
                      for scale in LS_GAMMA_SCALES], fit=fit_with_unlabelled)
    return {**out, "unlabelled_used": len(s.x_u), "unlabelled_pool": s.unlabelled_pool}


def sklearn_baselines(url: str, names: list[str], seed: int, max_unlabelled: int = 4000,
                      protocol: str = "oracle-val") -> dict:
    """{name: result} for the scikit-learn methods in `names` on one shard directory, on one thread (OpenMP
    threads of gradient boosting, competing with training runs for the cores, made it 20x slower)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return _sklearn_baselines(Splits(url, seed, max_unlabelled, protocol), names, seed)


def _sklearn_baselines(s: Splits, names: list[str], seed: int) -> dict:
    fns = {"lr": logistic_regression, "rf": random_forest, "gb": gradient_boosting, "label_spreading": label_spreading}
    out: dict = {}
    for name in [n for n in SKLEARN if n in names]:
        t0 = time.time()
        out[name] = self_training(s, seed, out) if name == "self_training" else fns[name](s, seed)
        out[name]["seconds"] = round(time.time() - t0, 1)
    return {n: {k: v for k, v in r.items() if k != "_model"} for n, r in out.items() if n in names}


# ----------------------------------------------------------------------------- VAT and the Pi-model


def model_config(cfg: C.Config, manifest: dict) -> C.ModelConfig:
    """The config's model with the data's shape and class count."""
    return replace(cfg.model, x_shape=tuple(manifest["x_shape"]), num_classes=int(manifest["num_classes"]))


def train_neural(method: str, cfg: C.Config, url: str, seed: int, settings: dict, select: str = "val") -> dict:
    """One VAT or Pi-model run with fixed settings. select "val": the weights best on validation (passes every
    train.eval_every updates), tested; "final": the weights at the end, tested, and the validation split is
    never read."""
    manifest = data.read_manifest(url)
    mcfg = model_config(cfg, manifest)
    torch.manual_seed(seed)
    if method == "pi":
        model = B.Classifier(mcfg, input_noise=settings["noise"], dropout=settings.get("dropout", PI_DROPOUT))
    else:
        model = B.Classifier(mcfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr_encoder, betas=cfg.optim.betas,
                           weight_decay=cfg.optim.weight_decay)
    steps, every = cfg.train.steps, cfg.train.eval_every or max(1, cfg.train.steps // 10)
    sqrt_d = math.sqrt(math.prod(mcfg.x_shape))
    stream = data.train_batches(url, batch_unlabelled=cfg.data.batch_unlabelled, batch_labelled=cfg.data.batch_labelled,
                                seed=seed, shuffle_buffer=cfg.data.shuffle_buffer, num_workers=cfg.data.workers,
                                cache_mb=cfg.data.cache_mb)

    def accuracy(split: str) -> dict:
        model.eval()
        out = evaluate(model, data.eval_batches(url, split, batch_size=cfg.data.eval_batch), mcfg.num_classes, "cpu")
        model.train()
        return out

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
            loss = ce + settings.get("weight", 1.0) * unsup
        else:
            logits_a, logits_b = model(x_all), model(x_all)
            ce = F.cross_entropy(logits_a[len(batch["x_u"]):], y_l)
            loss = ce + settings["w"] * B.rampup(step, steps // 4) * B.pi_loss(logits_a, logits_b)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{method} with {settings}: non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if select == "val" and (step % every == 0 or step == steps):
            acc = accuracy("val")["accuracy"]
            if acc > best[0]:
                best = (acc, step, copy.deepcopy(model.state_dict()))
    if select == "val":
        model.load_state_dict(best[2])
    model.eval()
    out = {"select": select, "val_accuracy": best[0] if select == "val" else None,
           "best_step": best[1] if select == "val" else None, "settings": settings}
    if manifest["splits"].get("test", {}).get("count", 0):
        test = accuracy("test")
        out.update(test_accuracy=test["accuracy"], test_macro_f1=test["macro_f1"])
    return out


def parse_settings(text: str, method: str, base: dict | None = None) -> dict:
    """A network baseline's setting from JSON: exactly the keys of FIXED[method], or some of them merged over
    `base` (launch/screen.py merges over FIXED[method])."""
    try:
        given = json.loads(text)
    except json.JSONDecodeError as e:
        raise C.ConfigError(f"--settings {text!r} is not JSON ({e}); e.g. '{{\"eps\": 0.05}}'") from None
    if not isinstance(given, dict):
        raise C.ConfigError(f"--settings for {method} must be a JSON object; got {type(given).__name__}")
    keys = FIXED[method]
    if unknown := sorted(set(given) - set(keys)):
        raise C.ConfigError(f"--settings: unknown {method} setting(s) {', '.join(unknown)}; known: {', '.join(keys)}")
    settings = {**(base or {}), **given}
    if set(settings) != set(keys):
        raise C.ConfigError(f"--settings for {method} needs exactly the keys {', '.join(sorted(keys))}; "
                            f"got {', '.join(sorted(settings))}")
    return settings


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
                    settings: dict | None = None, protocol: str = "oracle-val") -> dict:
    """`method` under `protocol`: realistic runs its FIXED setting once and tests the final weights; oracle-val
    runs its grid (or only `settings`, chosen elsewhere), each to cfg.train.steps, and keeps the run best on
    validation."""
    if method not in NEURAL:
        raise ValueError(f"unknown method {method!r}; neural baselines: {', '.join(NEURAL)}")
    realistic = not P.reads_validation(protocol)
    if realistic:
        grid = [FIXED[method] if settings is None else settings]
    elif settings is not None:
        grid = [settings]
    elif method == "vat":
        grid = [{"xi": xi, "eps": eps, "weight": w, "entmin": entmin} for xi, eps, w in VAT_GRID]
    else:
        grid = [{"w": w, "noise": noise, "dropout": PI_DROPOUT} for w, noise in PI_GRID]
    t0 = time.time()
    runs = [train_neural(method, cfg, url, seed, settings, "final" if realistic else "val") for settings in grid]
    best = max(runs, key=lambda r: r["val_accuracy"] or 0.0)  # realistic: the one run
    budget = P.network_budget(protocol, cfg.train.steps, settings_tried=len(grid))
    return {**best, "candidates": [{**r["settings"], "val_accuracy": r["val_accuracy"],
                                    "best_step": r["best_step"]} for r in runs],
            "steps": cfg.train.steps, "budget": budget.record(), "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", required=True, help="YAML config file (its model, data batch sizes, optim, steps)")
    p.add_argument("--shards", required=True, help="shard directory URL (holding manifest.json)")
    p.add_argument("--method", required=True, choices=[*SKLEARN, *NEURAL])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--protocol", default="realistic", choices=P.PROTOCOLS,
                   help="realistic (labelled rows only; default) or oracle-val (settings chosen on validation)")
    p.add_argument("--entmin", type=float, default=0.0, help="vat: weight of entropy minimisation (default 0)")
    p.add_argument("--max-unlabelled", type=int, default=4000, help="self_training: unlabelled rows it sees")
    p.add_argument("--out", default="", help="also write the result as JSON here")
    p.add_argument("--settings-from", default="", help="vat / pi: skip the grid and run only the setting this "
                   "earlier --out JSON of the same method chose on its validation split (e.g. another seed's)")
    p.add_argument("--settings", default="", help="vat / pi: skip the grid and run only this setting, as JSON with "
                   "every key of the method's fixed settings (FIXED), e.g. for vat "
                   "'{\"xi\": 0.1, \"eps\": 0.05, \"weight\": 1.0, \"entmin\": 0.0}'")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.steps=1000")
    a = p.parse_args(argv)
    try:
        cfg = C.load_config(a.config, a.overrides)
        if cfg.train.cpu_threads and not torch.cuda.is_available():
            torch.set_num_threads(cfg.train.cpu_threads)
        if a.settings and (a.settings_from or a.method not in NEURAL):
            raise C.ConfigError(f"--settings is for the network baselines ({', '.join(NEURAL)}) and replaces "
                                "--settings-from; pass one of them")
        if a.method in NEURAL:
            chosen = (settings_from(a.settings_from, a.method) if a.settings_from
                      else parse_settings(a.settings, a.method) if a.settings else None)
            result = neural_baseline(a.method, cfg, a.shards, a.seed, a.entmin, chosen, a.protocol)
            if a.settings_from:
                result["settings_from"] = a.settings_from
        elif a.settings_from:
            raise C.ConfigError(f"--settings-from is for the network baselines ({', '.join(NEURAL)}), "
                                f"not --method {a.method}")
        else:
            result = sklearn_baselines(a.shards, [a.method], a.seed, a.max_unlabelled, a.protocol)[a.method]
    except (C.ConfigError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    text = json.dumps({"method": a.method, "protocol": a.protocol, "shards": a.shards, "seed": a.seed, **result},
                      indent=1)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text if not a.out else f"{a.method} ({a.protocol}): test {result.get('test_accuracy', float('nan')):.4f}; "
          f"wrote {a.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
