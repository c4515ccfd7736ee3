"""A scikit-learn classifier on the whole pipeline: fit(X, y) with y = -1 on the unlabelled rows.

    from ssl_ebm.sklearn import LatentEBMClassifier
    clf = LatentEBMClassifier(random_state=0).fit(X, y)  # y: class labels of any type, -1 on unlabelled rows
    clf.predict(X_new), clf.predict_proba(X_new), clf.score(X_test, y_test), clf.classes_
    clf.model_.encode(X_new), clf.model_.sample(16, y=0)  # the API's Model (ssl_ebm/api.py), in X's units
    python -m ssl_ebm.sklearn --bench                     # fit time, 20 labelled + 5,000 unlabelled rows

`fit` runs the project's pipeline, not a copy of it, in a temporary folder it removes afterwards:
1. the rows go to a table file that the shard writer reads with its `table` reader (shards/sources.py), so
   they are encoded as any table is: features scaled with statistics of all the rows, labelled and not;
2. the shard writer (shards/make.py) splits them as y says: the labelled split holds exactly the rows with a
   label, every other row is unlabelled, and there is no validation or test split. No label outside the
   labelled rows is ever read, and no checkpoint is chosen on labels: the model is the final weights, the
   realistic protocol (Oliver et al., 2018);
3. launch/train.py's train() trains it (Algorithm 1, the watchdog, checkpoints as its restore points) on the
   shared tabular defaults, configs/tabular.yaml, read at every fit: when the team changes them, the
   estimator follows. Keyword arguments left at None keep them; `overrides` reaches any other config key;
4. the last checkpoint is loaded as the API's Model (`model_`), which predicts, encodes and samples.

The shard writer's protocol draws the labelled rows itself (class-balanced, seeded); here y decides them, so
build() is handed the split as a `Plan` in place of its own `plan_splits` for that one call (`_given_split`).
A `plan=` argument to shards.make.build would make that a plain call.

launch/train.py and configs/tabular.yaml are read from the checkout this package is installed from
(`pip install -e .`): the launchers are scripts, not package modules. This module is the one in the package
that reaches above it, to the shard writer and the training script (tests/test_layout.py names it).

X holds numbers for now, all finite (`_numeric_columns`, `_finite`). The table file is where more column kinds
come in: write_shards hands the shard writer the DataFrame it is given, so once the table reader encodes
categorical columns and missing values, a DataFrame can pass through as it is and the shards get the reader's
encoding; predicting then needs the Model to encode new rows the same way (ssl_ebm/api.py).

One process, one fit at a time, in the main thread (the training loop installs signal handlers for SLURM
preemption). What a run changes in its process is put back when fit returns: the random-number states it
seeds, torch's thread count, the signal handlers, Accelerate's process-wide state (so repeated fits, as in
cross_val_score or GridSearchCV, each start afresh). Parallel fits (n_jobs) take joblib's default process
backend. A SIGTERM during fit ends it as it ends training: the loop checkpoints and raises Preempted.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import io
import json
import os
import signal
import tempfile
import threading
import time
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.metrics import accuracy_score
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ssl_ebm import api, runtime
from ssl_ebm import config as C
from ssl_ebm.checkpoint import CheckpointStore

REPO = Path(__file__).resolve().parents[1]
TABULAR_DEFAULTS = REPO / "configs" / "tabular.yaml"  # the shared tabular defaults, read at every fit
TRAIN_SCRIPT = REPO / "launch" / "train.py"
UNLABELLED = -1  # y's value on an unlabelled row (in a string array, "-1")
LABEL_COLUMN = "__label__"  # the label column of the table file the shard writer reads

# The keyword arguments and the config keys they set; None keeps configs/tabular.yaml's value.
PARAMS = {
    "n_updates": "train.steps",  # optimizer updates (not `steps`: Pipeline has an attribute of that name)
    "z_dim": "model.z_dim",
    "hidden": "model.hidden",
    "prior_hidden": "model.prior_hidden",
    "labelled_weight": "model.labelled_weight",
    "obs_sigma": "model.obs_sigma",
    "vat_weight": "model.vat_weight",
    "sampler_steps": "sampler.steps",
    "batch_unlabelled": "data.batch_unlabelled",
    "batch_labelled": "data.batch_labelled",  # None: the shared default, at most the number of labelled rows
    "lr_prior": "optim.lr_prior",
    "lr_encoder": "optim.lr_encoder",
    "lr_generator": "optim.lr_generator",
    "features": "data.features",
}
# Keys the estimator sets itself at fit time: where the shards and the run go, what the data and
# random_state / verbose decide. An override naming one is refused.
MANAGED = ("data.shards", "data.dataset", "data.source", "data.num_labelled", "data.split_seed", "train.out_dir",
           "train.checkpoint_dir", "train.resume", "train.stop_after", "train.seed", "train.progress",
           "train.log_with", "model.x_shape", "model.num_classes")


class LatentEBMClassifier(ClassifierMixin, BaseEstimator):
    """Semi-supervised classifier with a latent-space energy-based prior (Pang et al.), on tabular rows.

    fit(X, y): X numeric (N, D), an array or a DataFrame; y the class labels, -1 on the unlabelled rows (in
    an array of strings, "-1"). Labels may be of any type np.unique can order (ints, strings, ...).

    Parameters from `n_updates` to `features` set the config keys PARAMS names; None keeps the shared
    tabular default (configs/tabular.yaml, read at fit time). `overrides`: any other config key, as a dict
    {"model.prior_hidden": 100} or a list ["sampler.step_size=0.4"]. `random_state`: int (train.seed and the
    order of the unlabelled rows) or None (a fresh seed per fit). `device`: None (the GPU if there is one),
    "cpu", "cuda" or "cuda:N"; the fitted model predicts on the CPU. `verbose`: 0 quiet, 1 a progress bar
    and the training loop's lines.

    Fitted: classes_, n_features_in_ (feature_names_in_ for a DataFrame with string column names), model_ (the
    API's Model: predict_proba, encode, sample, generate, score in X's units), training_ (what train() returned:
    seconds, watchdog recoveries, ...).
    """

    def __init__(self, n_updates=None, z_dim=None, hidden=None, prior_hidden=None, labelled_weight=None, obs_sigma=None,
                 vat_weight=None, sampler_steps=None, batch_unlabelled=None, batch_labelled=None, lr_prior=None,
                 lr_encoder=None, lr_generator=None, features=None, overrides=None, random_state=None, device=None,
                 verbose=0):
        self.n_updates = n_updates
        self.z_dim = z_dim
        self.hidden = hidden
        self.prior_hidden = prior_hidden
        self.labelled_weight = labelled_weight
        self.obs_sigma = obs_sigma
        self.vat_weight = vat_weight
        self.sampler_steps = sampler_steps
        self.batch_unlabelled = batch_unlabelled
        self.batch_labelled = batch_labelled
        self.lr_prior = lr_prior
        self.lr_encoder = lr_encoder
        self.lr_generator = lr_generator
        self.features = features
        self.overrides = overrides
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    # ------------------------------------------------------------------ fitting
    def fit(self, X, y):
        """Train on the rows of X: the labelled ones (y != -1) and all of them as unlabelled data."""
        _numeric_columns(X)
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32], ensure_all_finite=False)
        _finite(X)
        classes, codes = split_labels(y)
        seed = _seed(self.random_state)
        device = _device(self.device)
        overrides = self._overrides(codes, seed)
        cfg = C.load_config(str(TABULAR_DEFAULTS), overrides)  # a bad value stops here, before anything is written
        if cfg.train.steps < 1:
            raise ValueError(f"n_updates is {cfg.train.steps}; LatentEBMClassifier needs at least 1 update")
        names = [str(n) for n in getattr(self, "feature_names_in_", [f"x{i}" for i in range(X.shape[1])])]
        with tempfile.TemporaryDirectory(prefix="ssl_ebm_fit_") as scratch:
            url = write_shards(_frame(X, names), codes, classes, scratch, seed, features=cfg.data.features)
            self.model_, self.training_ = train_model(overrides, url, scratch, device, self.verbose)
        self.classes_ = classes
        return self

    def _overrides(self, codes: np.ndarray, seed: int) -> list[str]:
        """The dotted overrides of configs/tabular.yaml for this fit: the given keyword arguments, `overrides`,
        the labelled batch (at most the labelled rows, as every tabular config sets it), seed and verbosity."""
        given = {key: getattr(self, name) for name, key in PARAMS.items() if getattr(self, name) is not None}
        extra = _override_dict(self.overrides)
        for key, value in extra.items():
            if key in MANAGED:
                raise ValueError(f"overrides: {key} is set by LatentEBMClassifier at fit time; remove it"
                                 + (" (use random_state)" if key == "train.seed" else
                                    " (use verbose)" if key == "train.progress" else ""))
            if key in given:
                name = next(n for n, k in PARAMS.items() if k == key)
                raise ValueError(f"{name}={given[key]!r} and overrides {key}={value!r} both set {key}; keep one")
        given.update(extra)
        n_labelled = int((codes >= 0).sum())
        if "data.batch_labelled" not in given:
            shared = C.load_config(str(TABULAR_DEFAULTS), _dotted(given)).data.batch_labelled
            given["data.batch_labelled"] = min(shared, n_labelled)
        given.update({"train.seed": seed, "train.progress": bool(self.verbose), "train.log_with": "none",
                      "train.resume": "never"})
        return _dotted(given)

    # ------------------------------------------------------------------ prediction
    def predict_proba(self, X) -> np.ndarray:
        """p(y | x) = softmax(f(mu(x))), (N, K), columns in the order of classes_."""
        check_is_fitted(self, "model_")
        X = _finite(validate_data(self, X, reset=False, dtype=[np.float64, np.float32], ensure_all_finite=False))
        proba = self.model_.predict_proba(X).double().numpy()
        return proba / proba.sum(axis=1, keepdims=True)  # rows sum to 1 in float64, not only in float32

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self, "model_")
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def score(self, X, y, sample_weight=None) -> float:
        """Accuracy on the labelled rows of (X, y); rows with y = -1 are left out (a scorer named by string,
        scoring="accuracy", counts them as errors instead)."""
        y = np.asarray(y)
        known = ~unlabelled_rows(y)
        if not known.any():
            raise ValueError("y has no labelled rows to score (every value is -1); score on rows with labels")
        weight = None if sample_weight is None else np.asarray(sample_weight)[known]
        return float(accuracy_score(y[known], self.predict(_rows(X, known)), sample_weight=weight))

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict:
        """The fitted Model travels as the files ssl_ebm.export writes (config, manifest, safetensors weights), so
        a pickle holds no tensors of the device it was fitted on and no pickled model code."""
        state = super().__getstate__()
        if isinstance(state.get("model_"), api.Model):
            state = {**state, "model_": model_files(state["model_"])}
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state.get("model_"), dict):
            state = {**state, "model_": model_from_files(state["model_"])}
        super().__setstate__(state)


# ----------------------------------------------------------------------------- labels


def unlabelled_rows(y: np.ndarray) -> np.ndarray:
    """The rows whose label is -1 (or "-1" in an array of strings or objects)."""
    if y.dtype.kind in "OUS":
        return np.array([v == "-1" if isinstance(v, str) else _is_minus_one(v) for v in y], dtype=bool)
    return y == UNLABELLED


def _is_minus_one(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) \
        and v == UNLABELLED


def split_labels(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(classes, sorted; codes (N,): each row's index into classes, -1 on the unlabelled rows)."""
    unlabelled = unlabelled_rows(y)
    if unlabelled.all():
        raise ValueError("y has no labelled rows (every value is -1): label some rows of each class, at least two "
                         "classes")
    known = y[~unlabelled]
    try:
        check_classification_targets(known)
        classes, codes_known = np.unique(known, return_inverse=True)
    except TypeError as e:
        raise ValueError(f"y mixes labels that cannot be ordered ({e}); give the labelled rows labels of one type "
                         "and the unlabelled rows -1") from None
    if len(classes) < 2:
        only = classes[0].item() if isinstance(classes[0], np.generic) else classes[0]
        raise ValueError(f"y's labelled rows hold one class ({only!r}); a classifier needs at least 2 classes: "
                         "label rows of another class too")
    codes = np.full(len(y), UNLABELLED, dtype=np.int64)
    codes[~unlabelled] = codes_known.reshape(-1)
    return classes, codes


# ----------------------------------------------------------------------------- the pipeline


def write_shards(frame, codes: np.ndarray, classes: np.ndarray, scratch: str, seed: int, features: str) -> str:
    """Shards of the rows of `frame` (a DataFrame of the features) in `scratch`, split as codes say (-1:
    unlabelled), by the shard writer through its table reader; their URL. The reader decides how columns are
    encoded, so a column type it learns to read is encoded here as in any table's shards."""
    from shards import make

    if LABEL_COLUMN in frame.columns:
        raise ValueError(f"X has a column named {LABEL_COLUMN!r}, the name the label takes in the table file; "
                         "rename that column")
    table = f"{scratch}/rows.parquet"
    frame = frame.assign(**{LABEL_COLUMN: np.maximum(codes, 0)})  # unlabelled rows need some class; none is read
    frame.to_parquet(table, index=False)
    url = f"{scratch}/shards"
    with _given_split(make, _plan(make, codes, classes, seed)):
        make.build("table", url, source=table, label_column=LABEL_COLUMN, features=features, progress=False)
    return url


def _plan(make, codes: np.ndarray, classes: np.ndarray, seed: int):
    """The split y gives: labelled = the rows with a label, the classes interleaved as the writer orders them (any
    contiguous part is balanced: data.py splits it by rank); unlabelled = the others, shuffled; no val, no test."""
    rows = np.arange(len(codes))
    labelled, known = rows[codes >= 0], codes[codes >= 0]
    position = np.zeros(len(known))
    for c in np.unique(known):
        position[known == c] = (np.arange((known == c).sum()) + 0.5) / (known == c).sum()
    labelled = labelled[np.lexsort((known, position))]
    unlabelled = np.random.default_rng(seed).permutation(rows[codes < 0])
    splits = {"labelled": labelled, "unlabelled": unlabelled, "val": rows[:0], "test": rows[:0]}
    return make.Plan({s: ("all", r) for s, r in splits.items()}, {"all": np.maximum(codes, 0)},
                     [str(c) for c in classes], "all",
                     {"num_labelled": len(labelled), "num_val": 0, "labelled_rows": "given by y (ssl_ebm.sklearn)"})


@contextlib.contextmanager
def _given_split(make, plan):
    """make.build splits by `plan` for the block, instead of drawing the labelled rows by its protocol."""
    own = make.plan_splits
    make.plan_splits = lambda *args, **kwargs: plan
    try:
        yield
    finally:
        make.plan_splits = own


@functools.lru_cache(maxsize=1)
def _train_script():
    """launch/train.py of this checkout, imported once, by path."""
    if not TRAIN_SCRIPT.is_file() or not TABULAR_DEFAULTS.is_file():
        raise FileNotFoundError(f"LatentEBMClassifier trains with {TRAIN_SCRIPT} and {TABULAR_DEFAULTS}, which are "
                                "missing: install ssl-ebm from its checkout (pip install -e .)")
    spec = importlib.util.spec_from_file_location("ssl_ebm_launch_train", TRAIN_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def train_model(overrides: list[str], url: str, scratch: str, device: str | None, verbose: int):
    """Train on the shards at `url` with launch/train.py's train(); (the last weights as the API's Model, on the
    CPU; what train() returned)."""
    script = _train_script()
    raw = C.raw_tree(str(TABULAR_DEFAULTS), [*overrides, f"data.shards={url}", f"train.out_dir={scratch}/run"])
    cfg = C.from_dict(C.Config, raw)
    with _one_run(device, verbose):  # loading too: building the nets draws their initial weights
        results = script.train(cfg, raw)
        store = CheckpointStore(f"{scratch}/run/checkpoints")
        last = store.latest("step")  # written at the last update; no val split, so no best-* to choose
        model = api.load(store.url_of(last), allow_pickle=True, shards=url)  # this fit's own checkpoint
        if cfg.train.ema_decay > 0:  # the weights' average, what the loop would have tested
            model.net.load_state_dict(store.read_torch(last, "ema.pt")["shadow"])
    return model, results


@contextlib.contextmanager
def _one_run(device: str | None, verbose: int):
    """Room for one training run in this process, and what it changes put back afterwards (module docstring)."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("LatentEBMClassifier.fit runs in the main thread only (the training loop installs signal "
                           "handlers); for parallel fits use processes, joblib's default backend")
    rng, threads = runtime.RngState.capture(), torch.get_num_threads()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    env = {k: os.environ.get(k) for k in ("ACCELERATE_USE_CPU", "ACCELERATE_TORCH_DEVICE")}
    runtime.forget_accelerate_state()
    if device is not None:
        os.environ["ACCELERATE_TORCH_DEVICE"] = device
        if device == "cpu":
            os.environ["ACCELERATE_USE_CPU"] = "true"
    cuda_index = torch.device(device).index if device and device.startswith("cuda") else None
    try:
        with contextlib.ExitStack() as stack:
            if cuda_index is not None:
                stack.enter_context(torch.cuda.device(cuda_index))
            if not verbose:
                stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            yield
    finally:
        runtime.forget_accelerate_state()
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        torch.set_num_threads(threads)
        rng.restore()


# ----------------------------------------------------------------------------- pickling the Model


def model_files(model: api.Model) -> dict[str, bytes]:
    """The files ssl_ebm.export writes for `model`, by name."""
    url = f"memory://ssl_ebm_sklearn/{uuid.uuid4().hex}"
    api.export(model, url)
    fs, root = fsspec.core.url_to_fs(url)
    try:
        return {name: fs.cat_file(f"{root}/{name}") for name in (api.CONFIG, api.MANIFEST, api.WEIGHTS)}
    finally:
        fs.rm(root, recursive=True)


def model_from_files(files: dict[str, bytes]) -> api.Model:
    url = f"memory://ssl_ebm_sklearn/{uuid.uuid4().hex}"
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    rng = runtime.RngState.capture()  # building the nets draws initial weights from the global generator
    try:
        for name, blob in files.items():
            fs.pipe_file(f"{root}/{name}", blob)
        return api.load(url)
    finally:
        fs.rm(root, recursive=True)
        rng.restore()


# ----------------------------------------------------------------------------- parameters


def _override_dict(overrides) -> dict:
    """`overrides` as {dotted key: value}: from a dict ({"model.z_dim": 16}, or nested {"model": {"z_dim": 16}}),
    or from a list of "section.key=value" (values read as YAML, as on the command line)."""
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        return dict(_flat(overrides))
    if isinstance(overrides, (list, tuple)) and all(isinstance(o, str) for o in overrides):
        return dict(_flat(C.parse_overrides(list(overrides))))
    raise ValueError(f"overrides is a {type(overrides).__name__}; give a dict {{'model.z_dim': 16}} or a list "
                     "['model.z_dim=16']")


def _flat(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _dotted(values: dict) -> list[str]:
    """{dotted key: value} as the config loader's "key=value" overrides (values written as JSON, which YAML reads)."""
    return [f"{key}={json.dumps(value.item() if isinstance(value, np.generic) else value)}"
            for key, value in values.items()]


def _seed(random_state) -> int:
    """train.seed: random_state itself, or a draw from it (None: a fresh seed)."""
    if isinstance(random_state, (int, np.integer)) and not isinstance(random_state, bool):
        if not 0 <= random_state < 2**31:
            raise ValueError(f"random_state is {random_state}; use an int in [0, 2**31) or None")
        return int(random_state)
    from sklearn.utils import check_random_state

    return int(check_random_state(random_state).randint(2**31 - 1))


def _device(device) -> str | None:
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device is {device!r}; use None (the GPU if there is one), 'cpu', 'cuda' or 'cuda:N'")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device is {device!r} but torch sees no GPU here; use device='cpu' or None")
    return str(parsed)


def _frame(X: np.ndarray, names: list[str]) -> pd.DataFrame:
    return pd.DataFrame(X, columns=names)


def _numeric_columns(X) -> None:
    """A DataFrame's columns must be numbers (bools included) for now: name the first that is not."""
    dtypes = getattr(X, "dtypes", None)
    if dtypes is None or not hasattr(X, "columns"):
        return
    for column, dtype in dtypes.items():
        if not (pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)):
            raise ValueError(f"X column {column!r} is {dtype}, not numeric: LatentEBMClassifier reads numeric "
                             "columns; encode it first (e.g. OneHotEncoder or OrdinalEncoder in a Pipeline)")


def _finite(X: np.ndarray) -> np.ndarray:
    """X itself if every value is finite. Missing values are refused, as the shard writer refuses them in a table."""
    rows = np.flatnonzero(~np.isfinite(X).all(axis=1))
    if len(rows):
        raise ValueError(f"X holds NaN or infinite values in {len(rows)} row(s), the first at row {rows[0]}; "
                         "LatentEBMClassifier reads finite numbers: impute or drop them first (e.g. SimpleImputer "
                         "in a Pipeline)")
    return X


def _rows(X, mask: np.ndarray):
    """The rows of X (an array, a DataFrame or a list of rows) where mask is true."""
    return X.iloc[np.flatnonzero(mask)] if hasattr(X, "iloc") else np.asarray(X)[mask]


# ----------------------------------------------------------------------------- benchmark


def bench(data: str, labelled: int = 20, unlabelled: int = 5000, seed: int = 0, overrides: list[str] | None = None
          ) -> dict:
    """Fit once, with the shared defaults (and `overrides`), on `labelled` + `unlabelled` training rows of a shared
    table (.npz with x_train, y_train, x_test, y_test): how long fit takes, the machine's load around it (other
    processes share its cores), the CPU time it used (all its threads), and the accuracy on the table's test part."""
    with np.load(data) as z:
        x, y, x_test, y_test = z["x_train"], z["y_train"].astype(np.int64), z["x_test"], z["y_test"].astype(np.int64)
    rows = np.random.default_rng(seed).permutation(len(x))[:labelled + unlabelled]
    x, y = x[rows], y[rows]
    y_semi = np.full(len(y), UNLABELLED)
    for c in np.unique(y):  # class-balanced labels, as the shard writer draws them
        y_semi[np.flatnonzero(y == c)[:labelled // len(np.unique(y))]] = c
    load_before = os.getloadavg()[0]
    t0, cpu0 = time.perf_counter(), time.process_time()
    clf = LatentEBMClassifier(overrides=overrides or None, random_state=seed).fit(x, y_semi)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    n_labelled = int((y_semi != UNLABELLED).sum())
    return {"data": data, "labelled": n_labelled, "unlabelled": len(y_semi) - n_labelled,
            "steps": clf.model_.cfg.train.steps, "overrides": overrides or [], "fit_seconds": round(seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1),
            "train_seconds": clf.training_["seconds"], "torch_threads": clf.model_.cfg.train.cpu_threads or
            torch.get_num_threads(), "cpus": os.cpu_count(), "load_1min_before": round(load_before, 2),
            "load_1min_after": round(os.getloadavg()[0], 2), "test_accuracy": round(clf.score(x_test, y_test), 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ssl_ebm.sklearn", description="LatentEBMClassifier's fit time")
    p.add_argument("--bench", action="store_true", help="fit once with the shared defaults and print the time, as JSON")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "magic_gamma" / "magic04.npz"))
    p.add_argument("--labelled", type=int, default=20)
    p.add_argument("--unlabelled", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="config overrides on top of the shared defaults, e.g. train.steps=1000")
    a = p.parse_args(argv)
    if not a.bench:
        p.print_help()
        return 2
    print(json.dumps(bench(a.data, a.labelled, a.unlabelled, a.seed, a.overrides)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
