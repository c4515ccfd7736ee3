"""The graph baseline: scikit-learn's kNN label spreading on the same shards (labelled, unlabelled, val, test).

    python launch/label_spreading.py data_cache/magic_gamma [--neighbors 5 7 10 20 50 100] [--out ls.json]

The graph is built on the labelled and unlabelled examples (the same training pool the EBM sees); the
number of neighbours is chosen on the validation split, as the EBM's checkpoint is, and the test accuracy
of that choice is reported (with every candidate's figures, k = 7 being scikit-learn's default).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import numpy as np
import torch
from sklearn.semi_supervised import LabelSpreading

from ssl_ebm import data


def load(url: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for batch in data.eval_batches(url, split, batch_size=4096):
        xs.append(batch["x"].flatten(1))
        ys.append(batch["y"])
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


def label_spreading(url: str, neighbors: list[int]) -> dict:
    (x_l, y_l), (x_u, _) = load(url, "labelled"), load(url, "unlabelled")
    (x_v, y_v), (x_t, y_t) = load(url, "val"), load(url, "test")
    x = np.concatenate([x_l, x_u])
    y = np.concatenate([y_l, np.full(len(x_u), -1)])
    scores = {}
    for k in neighbors:
        with warnings.catch_warnings():  # graph components without a label divide 0 by 0; those rows get class 0
            warnings.simplefilter("ignore", RuntimeWarning)
            model = LabelSpreading(kernel="knn", n_neighbors=k, alpha=0.2, max_iter=1000).fit(x, y)
            scores[k] = {"val_accuracy": float((model.predict(x_v) == y_v).mean()),
                         "test_accuracy": float((model.predict(x_t) == y_t).mean())}
    best = max(neighbors, key=lambda k: scores[k]["val_accuracy"])
    return {"shards": url, "labelled": int(len(y_l)), "unlabelled": int(len(x_u)), "n_neighbors": best,
            "val_accuracy": scores[best]["val_accuracy"], "test_accuracy": scores[best]["test_accuracy"],
            "candidates": {str(k): v for k, v in scores.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shards", help="shard directory URL (holding manifest.json)")
    p.add_argument("--neighbors", type=int, nargs="+", default=[5, 7, 10, 20, 50, 100])
    p.add_argument("--out", default="", help="also write the result as JSON here")
    a = p.parse_args(argv)
    try:
        result = label_spreading(a.shards, a.neighbors)
    except data.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
