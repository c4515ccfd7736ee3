"""LatentEBMClassifier (ssl_ebm/sklearn.py): scikit-learn's estimator checks, y = -1 for unlabelled rows, the
shards it writes, DataFrames with categories and missing values, a Pipeline in cross_val_score beside
SelfTrainingClassifier, pickling, clone, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from ssl_ebm.sklearn import LatentEBMClassifier

# Small nets, few updates at higher learning rates: a fit takes about 0.3 s of one core, and still scores over
# 0.9 on the checks' blobs (check_classifiers_train asks for 0.83). One torch thread, the estimator's default.
FAST = dict(n_updates=30, z_dim=4, hidden=32, prior_hidden=32, batch_unlabelled=32, sampler_steps=5, lr_prior=3e-3,
            lr_encoder=1e-2, overrides={"sampler.bank_size": 256}, random_state=0)

# The checks that do not fit a semi-supervised classifier, and why. scikit-learn exempts its own
# (LabelSpreading, SelfTrainingClassifier) from the first by name; it cannot know ours.
SEMI_SUPERVISED_EXCEPTIONS = {
    "check_classifiers_classes": (
        "its last problem labels the classes -1 and 1, and y = -1 marks an unlabelled row: the estimator sees one "
        "class and refuses it. The string and object labels of its other problems are checked in "
        "test_any_hashable_labels_and_unlabelled_rows"),
}


def expected_failures(estimator) -> dict:
    return SEMI_SUPERVISED_EXCEPTIONS


@parametrize_with_checks([LatentEBMClassifier(**FAST)], expected_failed_checks=expected_failures, xfail_strict=True)
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


# ----------------------------------------------------------------------------- labels and the shards y gives


def blobs(n: int = 240, k: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_blobs

    return make_blobs(n_samples=n, centers=k, n_features=4, cluster_std=1.0, random_state=seed)


def test_the_shards_hold_exactly_the_labelled_rows_and_no_validation_or_test(tmp_path):
    """The labelled split is the rows y labels (their labels, nothing else); every other row is unlabelled; no
    val or test split, so no other label exists; features are scaled with all rows' statistics."""
    import pandas as pd

    from ssl_ebm import data
    from ssl_ebm.sklearn import split_labels, write_shards

    x, y = blobs()
    y_semi = np.where(np.arange(len(y)) % 12 == 0, y, -1)  # 20 labelled rows of 240
    classes, codes = split_labels(y_semi)
    url = write_shards(pd.DataFrame(x, columns=["a", "b", "c", "d"]), codes, str(tmp_path), seed=0, features="standard")
    manifest = data.read_manifest(url)
    assert manifest["protocol"]["balance"] == "given"
    counts = {split: info["count"] for split, info in manifest["splits"].items()}
    assert counts == {"labelled": 20, "unlabelled": 220, "val": 0, "test": 0}
    labelled = manifest["split_indices"]["labelled"]
    assert sorted(labelled) == np.flatnonzero(y_semi != -1).tolist()
    assert sorted(manifest["split_indices"]["unlabelled"]) == np.flatnonzero(y_semi == -1).tolist()
    assert manifest["unlabelled_stream"] == ["unlabelled", "labelled"]  # every row feeds the unlabelled stream
    read = next(data.eval_batches(url, "labelled", batch_size=100))
    assert read["y"].tolist() == codes[labelled].tolist()
    assert np.allclose(manifest["normalisation"]["mean"], x.mean(0), atol=1e-5)
    assert manifest["source"]["feature_names"] == ["a", "b", "c", "d"]


def test_it_predicts_as_its_model_with_the_shared_defaults_graph_smoothing():
    """configs/tabular.yaml turns graph smoothing on: the fit's Model holds the graph of its rows, and the
    classifier's probabilities are the Model's (not softmax f(mu) alone)."""
    x, y = blobs(seed=4)
    clf = LatentEBMClassifier(**FAST).fit(x, np.where(np.arange(len(y)) % 10 == 0, y, -1))
    graph = clf.model_.graph
    assert graph is not None and graph.alpha == clf.model_.cfg.model.graph_smoothing > 0
    assert len(graph.mu_NZ) == len(x)  # the labelled rows and every unlabelled one (fewer than graph_pool)
    np.testing.assert_allclose(clf.predict_proba(x), clf.model_.predict_proba(x).double().numpy(), atol=1e-6)
    alone = clf.model_.net.predict_proba(clf.model_.to_model_units(x)).detach().double().numpy()
    assert np.abs(clf.predict_proba(x) - alone).max() > 1e-3


def test_any_hashable_labels_and_unlabelled_rows():
    """Strings (with "-1" unlabelled), objects (with the int -1 unlabelled, as SelfTrainingClassifier takes them)
    and ints: classes_ come from the labelled rows, predictions are labels, score leaves the -1 rows out."""
    x, y = blobs(seed=1)
    keep = np.arange(len(y)) % 6 == 0
    names = np.array(["cat", "dog"])[y]
    as_objects = np.where(keep, names.astype(object), np.full(len(y), -1, dtype=object))
    for y_semi in (np.where(keep, names, "-1"), as_objects, np.where(keep, y + 5, -1)):
        clf = LatentEBMClassifier(**FAST).fit(x, y_semi)
        assert clf.classes_.tolist() == sorted(set(y_semi[keep].tolist()))
        assert set(clf.predict(x).tolist()) <= set(clf.classes_.tolist())
        assert clf.score(x, y_semi) == pytest.approx(np.mean(clf.predict(x[keep]) == y_semi[keep]))
        truth = np.asarray(names if y_semi.dtype.kind in "OU" else y + 5, dtype=y_semi.dtype)
        assert clf.score(x, truth) > 0.9, "well separated blobs"


def test_a_dataframe_keeps_its_column_names():
    import pandas as pd

    x, y = blobs(seed=2)
    frame = pd.DataFrame(x, columns=["mass", "width", "length", "angle"])
    clf = LatentEBMClassifier(**FAST).fit(frame, np.where(np.arange(len(y)) % 8 == 0, y, -1))
    assert clf.feature_names_in_.tolist() == ["mass", "width", "length", "angle"]
    assert clf.model_.manifest["feature_names"] == ["mass", "width", "length", "angle"]
    shuffled = frame[["angle", "mass", "width", "length"]]
    with pytest.raises(ValueError, match="feature names"):  # scikit-learn's own check of the column order
        clf.predict(shuffled)
    assert np.array_equal(clf.predict(shuffled[clf.feature_names_in_]), clf.predict(frame))


def test_a_dataframe_with_categories_and_missing_values(tmp_path):
    """String and pandas categorical columns become the table reader's one-hot blocks and NaN its medians with an
    "is missing" column; predict encodes new rows exactly as the shards hold the fitted ones (the same vectors),
    a category never fitted takes its "(unseen)" slot, and the class signal that lives only in a string column is
    learnt. The encoding survives pickling."""
    import pickle

    import pandas as pd

    from shard_files import read_split
    from ssl_ebm import data
    from ssl_ebm.sklearn import split_labels, write_shards

    rng = np.random.default_rng(0)
    n = 240
    y = np.arange(n) % 3
    colour = np.array(["red", "green", "blue"], dtype=object)[y]  # the class, told by the string column only
    colour[rng.choice(n, 12, replace=False)] = None
    frame = pd.DataFrame({"noise": rng.normal(size=n), "count": rng.poisson(3, n).astype(float), "colour": colour,
                          "size": pd.Categorical(rng.choice(["S", "M", "L"], n)), "code": rng.choice(["7", "12"], n)})
    frame.loc[[3, 50, 77], "count"] = np.nan
    y_semi = np.where(np.arange(n) % 8 == 0, y, -1)  # 30 labelled rows
    clf = LatentEBMClassifier(**{**FAST, "n_updates": 60}).fit(frame, y_semi)
    manifest = clf.model_.manifest
    assert [b["categories"] for b in manifest["columns"]["categorical"]] == [
        ["(missing)", "blue", "green", "red", "(unseen)"], ["L", "M", "S", "(unseen)"], ["12", "7", "(unseen)"]]
    assert "count is missing" in manifest["feature_names"]
    assert clf.score(frame, y) > 0.9, "the colour column carries the class"
    # The same rows, written by the same writer: the vectors the model encodes are the ones its shards held.
    url = write_shards(clf._table(frame)[0], split_labels(y_semi)[1], str(tmp_path), seed=0, features="standard")
    x_read, _, _ = read_split(url, "unlabelled")
    rows = data.read_manifest(url)["split_indices"]["unlabelled"]
    np.testing.assert_allclose(clf.model_.to_model_units(clf._table(frame.iloc[rows])[0]).numpy(), x_read, atol=1e-6)
    new = pd.DataFrame({"noise": [0.1, 0.2], "count": [np.nan, 2.0], "colour": ["purple", "red"],
                        "size": pd.Categorical(["XL", "S"]), "code": ["3", "7"]})
    data_units = clf.model_.from_table(clf._table(new)[0])
    unseen = [b["start"] + b["size"] - 1 for b in manifest["columns"]["categorical"]]
    assert data_units[0, unseen].tolist() == [1.0] * 3 and data_units[1, unseen].tolist() == [0.0] * 3
    assert clf.predict(new)[1] == 0, "red is class 0"
    assert np.array_equal(pickle.loads(pickle.dumps(clf)).predict_proba(new), clf.predict_proba(new))


# ----------------------------------------------------------------------------- in scikit-learn's tools


def labelled_accuracy(estimator, X, y) -> float:
    """Accuracy on the rows of a test fold that carry a label (y != -1), for both estimators alike."""
    known = np.asarray(y) != -1
    return float(np.mean(estimator.predict(X[known]) == np.asarray(y)[known]))


def test_in_a_pipeline_and_cross_val_score_beside_self_training():
    """Scaler + LatentEBMClassifier in cross_val_score, and scaler + SelfTrainingClassifier on the same folds:
    both learn the task from 60 labels and 540 unlabelled rows (chance is 0.5; both stay well above it)."""
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.semi_supervised import SelfTrainingClassifier

    x, y = make_classification(n_samples=600, n_features=6, n_informative=4, n_redundant=0, n_clusters_per_class=1,
                               class_sep=1.5, random_state=0)
    x = x * [1, 10, 100, 1, 1, 1000]  # scales the scaler has to bring together
    y_semi = np.where(np.arange(len(y)) % 10 == 0, y, -1)
    folds = list(StratifiedKFold(3, shuffle=True, random_state=0).split(x, y_semi))  # the same labels per fold
    ours = make_pipeline(StandardScaler(), LatentEBMClassifier(**{**FAST, "n_updates": 60}))
    peer = make_pipeline(StandardScaler(), SelfTrainingClassifier(LogisticRegression()))
    ebm = cross_val_score(ours, x, y_semi, cv=folds, scoring=labelled_accuracy)
    self_training = cross_val_score(peer, x, y_semi, cv=folds, scoring=labelled_accuracy)
    print(f"labelled accuracy over 3 folds: LatentEBMClassifier {ebm.round(3)}, SelfTrainingClassifier "
          f"{self_training.round(3)}")
    assert ebm.mean() > 0.75 and self_training.mean() > 0.75, (ebm, self_training)
    assert cross_val_score(ours, x, y_semi, cv=folds[:1]).tolist() == ebm[:1].tolist(), \
        "the estimator's own score is the same accuracy on the labelled rows, and a refit gives the same model"


def test_joblib_and_clone(tmp_path):
    """A fitted estimator survives joblib.dump / load (its Model travels as exported files: no tensors, no
    pickled model code) and clone gives the same unfitted estimator; encode and sample work after loading."""
    import joblib
    from sklearn.base import clone

    x, y = blobs(seed=3)
    clf = LatentEBMClassifier(**FAST).fit(x, np.where(np.arange(len(y)) % 10 == 0, y, -1))
    joblib.dump(clf, tmp_path / "clf.joblib")
    assert b"torch" not in (tmp_path / "clf.joblib").read_bytes(), "the pickle must hold files, not tensors"
    loaded = joblib.load(tmp_path / "clf.joblib")
    assert np.array_equal(loaded.predict_proba(x), clf.predict_proba(x))
    assert np.array_equal(loaded.classes_, clf.classes_)
    mu, logvar = loaded.model_.encode(x[:5])
    assert mu.shape == logvar.shape == (5, FAST["z_dim"])
    assert loaded.model_.sample(3, y=1, seed=0).shape == (3, FAST["z_dim"])
    twin = clone(loaded)
    assert twin.get_params() == clf.get_params() and not hasattr(twin, "model_")
    assert np.array_equal(twin.fit(x, np.where(np.arange(len(y)) % 10 == 0, y, -1)).predict_proba(x),
                          clf.predict_proba(x)), "same data, same random_state: the same model"


def test_fit_leaves_the_process_as_it_found_it():
    """Repeated fits with different Accelerate settings (bf16, then fp32) in one process, and after each the
    global random states, torch's thread count and the SIGTERM handler are as before."""
    import random
    import signal

    import torch

    x, y = blobs(seed=4)
    y_semi = np.where(np.arange(len(y)) % 10 == 0, y, -1)
    threads, handler = torch.get_num_threads(), signal.getsignal(signal.SIGTERM)
    for precision in ("bf16", "no"):
        np.random.seed(7), random.seed(7), torch.manual_seed(7)
        expected = (np.random.rand(), random.random(), torch.rand(1).item())
        np.random.seed(7), random.seed(7), torch.manual_seed(7)
        overrides = {**FAST["overrides"], "train.mixed_precision": precision}
        clf = LatentEBMClassifier(**{**FAST, "overrides": overrides}).fit(x, y_semi)
        assert clf.model_.cfg.train.mixed_precision == precision
        assert (np.random.rand(), random.random(), torch.rand(1).item()) == expected
        assert torch.get_num_threads() == threads and signal.getsignal(signal.SIGTERM) == handler


# ----------------------------------------------------------------------------- parameters and the shared defaults


def test_parameters_follow_the_shared_tabular_defaults(tmp_path, monkeypatch):
    """None keeps configs/tabular.yaml's value, read at fit time (here a copy whose z_dim the team changed);
    keyword arguments and overrides set theirs; the labelled batch is at most the labelled rows."""
    from ssl_ebm import config as C
    from ssl_ebm import sklearn as sk

    changed = tmp_path / "tabular.yaml"
    changed.write_text(f"base: {sk.TABULAR_DEFAULTS}\nmodel:\n  z_dim: 3\n")
    monkeypatch.setattr(sk, "TABULAR_DEFAULTS", changed)
    x, y = blobs(seed=5)
    y_semi = np.where(np.arange(len(y)) % 10 == 0, y, -1)  # 24 labelled rows
    fast = {**FAST, "z_dim": None}
    cfg = LatentEBMClassifier(**fast).fit(x, y_semi).model_.cfg
    shared = C.load_config(str(changed))
    assert cfg.model.z_dim == 3 and cfg.model.obs_sigma == shared.model.obs_sigma
    assert cfg.data.batch_labelled == min(shared.data.batch_labelled, 24) == 24
    cfg = LatentEBMClassifier(**{**fast, "z_dim": 5, "overrides": ["sampler.bank_size=300", "model.sigma0=0.5"]}
                              ).fit(x, y_semi).model_.cfg
    assert (cfg.model.z_dim, cfg.sampler.bank_size, cfg.model.sigma0) == (5, 300, 0.5)
    for name, key in sk.PARAMS.items():  # every keyword argument is a real config key of the shared defaults
        section, field = key.split(".")
        assert hasattr(getattr(shared, section), field), key


X_BLOBS, Y_BLOBS = blobs(n=40, seed=6)
Y_SEMI = np.where(np.arange(40) % 4 == 0, Y_BLOBS, -1)


def test_one_torch_thread_unless_overridden():
    """fit passes train.cpu_threads=1 (fastest for these small MLPs, steady on a busy machine) unless overrides set
    it."""
    from ssl_ebm.sklearn import split_labels

    codes = split_labels(Y_SEMI)[1]
    assert "train.cpu_threads=1" in LatentEBMClassifier(**FAST)._overrides(codes, 0)
    assert "train.cpu_threads=0" in LatentEBMClassifier(overrides={"train.cpu_threads": 0})._overrides(codes, 0)
    assert LatentEBMClassifier(**FAST).fit(X_BLOBS, Y_SEMI).model_.cfg.train.cpu_threads == 1


@pytest.mark.parametrize("params, y, match", [
    ({}, np.full(40, -1), "y has no labelled rows"),
    ({}, np.where(np.arange(40) % 4 == 0, 1, -1), "labelled rows hold one class"),
    ({}, np.linspace(0, 1, 40), "Unknown label type"),
    ({"overrides": {"data.shards": "/tmp/x"}}, Y_SEMI, "overrides: data.shards is set by LatentEBMClassifier"),
    ({"overrides": {"train.seed": 3}}, Y_SEMI, r"train.seed is set by LatentEBMClassifier .* \(use random_state\)"),
    ({"z_dim": 8, "overrides": {"model.z_dim": 16}}, Y_SEMI, "z_dim=8 and overrides model.z_dim=16 both set"),
    ({"overrides": ["model.z_dimm=16"]}, Y_SEMI, "model.z_dimm: unknown config key; did you mean 'model.z_dim'"),
    ({"overrides": "model.z_dim=16"}, Y_SEMI, "overrides is a str; give a dict"),
    ({"z_dim": 0}, Y_SEMI, "model.z_dim: got 0; must be >= 1"),
    ({"n_updates": 0}, Y_SEMI, "n_updates is 0; LatentEBMClassifier needs at least 1 update"),
    ({"device": "tpu"}, Y_SEMI, "device is 'tpu'; use None"),
    ({"random_state": -1}, Y_SEMI, r"random_state is -1; use an int in \[0, 2\*\*31\) or None"),
])
def test_bad_input_is_one_clear_line(params, y, match):
    with pytest.raises(ValueError, match=match) as e:
        LatentEBMClassifier(**{**FAST, **params}).fit(X_BLOBS, y)
    assert "\n" not in str(e.value)


def test_bad_rows_and_places_are_one_clear_line():
    import threading

    import pandas as pd
    import torch

    frame = pd.DataFrame({"size": np.arange(40.0), "when": pd.date_range("2026-01-01", periods=40)})
    with pytest.raises(ValueError, match=r"X column 'when' is datetime64\[.*\]: LatentEBMClassifier reads numbers "
                                         "and categories .*; convert it to one of them first"):
        LatentEBMClassifier(**FAST).fit(frame, Y_SEMI)
    with pytest.raises(ValueError, match="X column 'notes' has no value .all 40 rows are missing.; drop it"):
        LatentEBMClassifier(**FAST).fit(frame.assign(when=1.0, notes=None), Y_SEMI)
    with pytest.raises(ValueError, match="X has a column named '__label__', the name the label takes in the table"):
        LatentEBMClassifier(**FAST).fit(pd.DataFrame({"__label__": np.arange(40.0)}), Y_SEMI)
    x = X_BLOBS.copy()
    x[3, 1] = np.inf
    with pytest.raises(ValueError, match="X holds infinite values in 1 row.s., the first at row 3; "):
        LatentEBMClassifier(**FAST).fit(x, Y_SEMI)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device is 'cuda' but torch sees no GPU here"):
            LatentEBMClassifier(**{**FAST, "device": "cuda"}).fit(X_BLOBS, Y_SEMI)
    errors = []
    worker = threading.Thread(target=lambda: _fit_into(errors))
    worker.start(), worker.join()
    assert len(errors) == 1 and "runs in the main thread only" in str(errors[0]), errors
    clf = LatentEBMClassifier(**FAST).fit(X_BLOBS, Y_SEMI)
    with pytest.raises(ValueError, match="y has no labelled rows to score"):
        clf.score(X_BLOBS, np.full(40, -1))


def _fit_into(errors: list) -> None:
    try:
        LatentEBMClassifier(**FAST).fit(X_BLOBS, Y_SEMI)
    except RuntimeError as e:
        errors.append(e)


def test_a_checkout_without_the_training_script_is_one_clear_line(tmp_path, monkeypatch):
    from ssl_ebm import sklearn as sk

    monkeypatch.setattr(sk, "TRAIN_SCRIPT", tmp_path / "launch" / "train.py")
    sk._train_script.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="LatentEBMClassifier trains with .*launch/train.py and .*"
                                                    r"tabular.yaml, which are missing: install ssl-ebm from its checkout"):
            LatentEBMClassifier(**FAST).fit(X_BLOBS, Y_SEMI)
    finally:
        sk._train_script.cache_clear()
