"""A scikit-learn classifier on the whole pipeline: fit(X, y) with y = -1 on the unlabelled rows.

    from ssl_ebm.sklearn import LatentEBMClassifier
    clf = LatentEBMClassifier(random_state=0).fit(X, y)  # y: class labels of any type, -1 on unlabelled rows
    clf.predict(X_new), clf.predict_proba(X_new), clf.score(X_test, y_test), clf.classes_
    clf.model_.encode(X_new), clf.model_.sample(16, y=0)  # the API's Model (ssl_ebm/api.py), in X's units
    python -m ssl_ebm.sklearn --bench                     # fit time, 20 labelled + 5,000 unlabelled rows

`fit` runs the project's pipeline, not a copy of it, in a temporary folder it removes afterwards:
1. the rows go to a table file that the shard writer reads with its `table` reader (shards/sources.py), so
   they are encoded as any table is, with statistics of all the rows, labelled and not: numeric columns
   scaled, a missing number (NaN) imputed by its column's median with a 0/1 "is missing" column beside it,
   categorical columns one-hot (ssl_ebm/features.py);
2. the shard writer (shards/make.py, build's labelled_rows) splits them as y says: the labelled split holds
   exactly the rows with a label, every other row is unlabelled, and there is no validation or test split.
   No label outside the labelled rows is ever read, and no checkpoint is chosen on labels: the model is the
   final weights, the realistic protocol (Oliver et al., 2018);
3. launch/train.py's train() trains it (Algorithm 1, the watchdog, checkpoints as its restore points) on the
   shared tabular defaults, configs/tabular.yaml, read at every fit: when the team changes them, the
   estimator follows. Keyword arguments left at None keep them; `overrides` reaches any other config key.
   Torch runs one thread on the CPU (train.cpu_threads=1, unless `overrides` sets it): the small MLPs run
   fastest on one, and two threads that wait for each other at every small matrix product run about ten
   times slower on a machine whose cores are busy (docs/PERFORMANCE.md);
4. the last checkpoint is loaded as the API's Model (`model_`), which predicts, encodes and samples.

launch/train.py and configs/tabular.yaml are read from the checkout this package is installed from
(`pip install -e .`): the launchers are scripts, not package modules. This module is the one in the package
that reaches above it, to the shard writer and the training script (tests/test_layout.py names it).

X is an array of numbers (its columns named x0, x1, ... in the table file) or a DataFrame: numeric columns (bools
as 0/1) are numbers, every other column of strings, pandas categoricals or objects is categories (one-hot, its
categories those of the fitted rows; a category new at predict time takes its block's "(unseen)" slot). NaN,
None and pd.NA mark a missing value in either; infinite values are refused. Predicting hands the Model the rows
as a DataFrame of the same columns, which it encodes by the shards' "columns" record exactly as the shard writer
encoded the fitted rows (ssl_ebm/api.py, Model.from_table).

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
from sklearn.utils.validation import check_consistent_length, check_is_fitted, column_or_1d, validate_data

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

    fit(X, y): X (N, D), an array of numbers or a DataFrame whose non-numeric columns (strings, pandas
    categoricals) are categories; NaN (None, pd.NA) where a value is missing. y the class labels, -1 on the
    unlabelled rows (in an array of strings, "-1"). Labels may be of any type np.unique can order (ints, strings).

    Parameters from `n_updates` to `features` set the config keys PARAMS names; None keeps the shared
    tabular default (configs/tabular.yaml, read at fit time). `overrides`: any other config key, as a dict
    {"model.prior_hidden": 100} or a list ["sampler.step_size=0.4"]. `random_state`: int (train.seed and the
    order of the unlabelled rows) or None (a fresh seed per fit). `device`: None (the GPU if there is one),
    "cpu", "cuda" or "cuda:N"; the fitted model predicts on the CPU. On the CPU torch runs one thread
    (train.cpu_threads=1, fastest for these small MLPs and steady on a busy machine); overrides
    {"train.cpu_threads": 0} gives torch its default. `verbose`: 0 quiet, 1 a progress bar and the training
    loop's lines.

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
        frame, y = self._table(X, y, fitting=True)
        _has_values(frame)
        classes, codes = split_labels(y)
        seed = _seed(self.random_state)
        device = _device(self.device)
        overrides = self._overrides(codes, seed)
        cfg = C.load_config(str(TABULAR_DEFAULTS), overrides)  # a bad value stops here, before anything is written
        if cfg.train.steps < 1:
            raise ValueError(f"n_updates is {cfg.train.steps}; LatentEBMClassifier needs at least 1 update")
        with tempfile.TemporaryDirectory(prefix="ssl_ebm_fit_") as scratch:
            url = write_shards(frame, codes, scratch, seed, features=cfg.data.features)
            model, self.training_ = train_model(overrides, url, scratch, device, self.verbose)
        self.model_ = _named_classes(model, classes)
        self.classes_ = classes
        return self

    def _table(self, X, y=None, fitting: bool = False):
        """X as a table of named columns (`_table_columns`), checked as scikit-learn checks input: fitting, the
        columns' count and names are recorded (and y checked, 1-D); predicting, compared with them."""
        target = y if fitting else "no_validation"
        if _is_frame(X):
            out = validate_data(self, X, target, reset=fitting, skip_check_array=True)  # names and count only
            if fitting:
                y = column_or_1d(out[1], warn=True)
                check_consistent_length(X, y)
            frame = _table_columns(X, self._column_names())
        else:  # numbers: scikit-learn's conversion and refusals, NaN let through to be imputed
            out = validate_data(self, X, target, reset=fitting, dtype=[np.float64, np.float32], ensure_all_finite=False)
            X, y = out if fitting else (out, None)
            frame = pd.DataFrame(X, columns=self._column_names())
        _no_infinity(frame)
        return frame, y

    def _column_names(self) -> list[str]:
        """The table file's column names: a DataFrame's (all strings) or x0, x1, ... by position."""
        return [str(n) for n in getattr(self, "feature_names_in_", [f"x{i}" for i in range(self.n_features_in_)])]

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
        given.setdefault("train.cpu_threads", 1)  # the small MLPs run fastest on one thread (module docstring)
        n_labelled = int((codes >= 0).sum())
        if "data.batch_labelled" not in given:
            shared = C.load_config(str(TABULAR_DEFAULTS), _dotted(given)).data.batch_labelled
            given["data.batch_labelled"] = min(shared, n_labelled)
        given.update({"train.seed": seed, "train.progress": bool(self.verbose), "train.log_with": "none",
                      "train.resume": "never"})
        return _dotted(given)

    # ------------------------------------------------------------------ prediction
    def predict_proba(self, X) -> np.ndarray:
        """p(y | x) = softmax(f(mu(x))), (N, K), columns in the order of classes_; smoothed over the fit's graph
        where the defaults turn graph smoothing on (model.graph_smoothing), as the API's Model predicts. The rows are encoded as the
        shards were (Model.to_model_units of a table's rows) and go through the nets in batches of one size,
        padded: float32 matrix products differ in their last bits with the number of rows, and a row should get
        the same probabilities alone as among others."""
        check_is_fitted(self, "model_")
        frame, step = self._table(X)[0], self.model_.batch_size
        parts = []
        with torch.no_grad():
            for i in range(0, len(frame), step):
                x = self.model_.to_model_units(frame.iloc[i:i + step])
                padded = torch.zeros((step, *x.shape[1:]), dtype=x.dtype, device=x.device)
                padded[:len(x)] = x
                parts.append(self.model_.proba_of(padded)[:len(x)].double().cpu())
        proba = torch.cat(parts).numpy() if parts else np.zeros((0, len(self.classes_)))
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

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True  # a missing value, imputed as the table reader imputes it
        return tags

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


def write_shards(frame: pd.DataFrame, codes: np.ndarray, scratch: str, seed: int, features: str) -> str:
    """Shards of the rows of `frame` (`_table_columns`) in `scratch`, split as codes say (-1: unlabelled), by the
    shard writer through its table reader; their URL. The reader decides how columns are encoded; the columns
    that are not numbers are named categorical, so that categories spelled as numbers stay categories."""
    from shards import make

    if LABEL_COLUMN in frame.columns:
        raise ValueError(f"X has a column named {LABEL_COLUMN!r}, the name the label takes in the table file; "
                         "rename that column")
    table = f"{scratch}/rows.parquet"
    # The class codes as labels (the shards name the classes 0..K-1); unlabelled rows need one too, none is read.
    frame.assign(**{LABEL_COLUMN: np.maximum(codes, 0)}).to_parquet(table, index=False)
    url = f"{scratch}/shards"
    make.build("table", url, source=table, seed=seed, labelled_rows=np.flatnonzero(codes >= 0),
               label_column=LABEL_COLUMN, features=features, progress=False,
               categorical_columns=[c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])])
    return url


def _named_classes(model: api.Model, classes: np.ndarray) -> api.Model:
    """`model` with its classes named as y names them (its shards name them by their codes 0..K-1), so that
    model.sample(n, y="cat") takes a label."""
    model.class_names = [str(c) for c in classes]
    model.manifest["class_names"] = model.class_names
    return model


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
    handlers = {s: signal.getsignal(s) for s in runtime.Preemption.SIGNALS}  # the ones training installs
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
        return {name: fs.cat_file(f"{root}/{name}") for name in (api.CONFIG, api.MANIFEST, api.WEIGHTS, api.GRAPH)
                if fs.exists(f"{root}/{name}")}
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


def _is_frame(X) -> bool:
    return hasattr(X, "columns") and hasattr(X, "dtypes") and hasattr(X, "iloc")


def _table_columns(X, names: list[str]) -> pd.DataFrame:
    """A DataFrame's columns as the table file holds them, renamed `names` by position: numeric columns (bools
    included) as float64, NaN where missing; every column of strings, pandas categoricals or objects as its
    category names (api.category_names, as the Model names them when it predicts), None where missing. Other
    kinds (dates, durations, complex numbers) are refused."""
    columns = {}
    for name, (label, column) in zip(names, X.items()):
        dtype = column.dtype
        if pd.api.types.is_bool_dtype(dtype) or (pd.api.types.is_numeric_dtype(dtype)
                                                  and not pd.api.types.is_complex_dtype(dtype)):
            columns[name] = api.table_numbers(column)
        elif isinstance(dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(dtype):
            columns[name] = api.category_names(column)
        else:
            raise ValueError(f"X column {label!r} is {dtype}: LatentEBMClassifier reads numbers and categories "
                             "(strings, pandas categoricals); convert it to one of them first")
    return pd.DataFrame(columns, index=range(len(X)))


def _has_values(frame: pd.DataFrame) -> None:
    """Every column of the rows to fit has a value somewhere (a median or a category to learn)."""
    for name in frame.columns:
        if frame[name].isna().all():
            raise ValueError(f"X column {name!r} has no value (all {len(frame)} rows are missing); drop it")


def _no_infinity(frame: pd.DataFrame) -> None:
    """No infinite number: NaN is a missing value, imputed; inf has no median to stand for it."""
    numbers = frame.select_dtypes("number").to_numpy(dtype=np.float64)
    rows = np.flatnonzero(np.isinf(numbers).any(axis=1))
    if len(rows):
        raise ValueError(f"X holds infinite values in {len(rows)} row(s), the first at row {rows[0]}; "
                         "LatentEBMClassifier reads finite numbers and NaN where a value is missing: replace or drop "
                         "them first")


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
