"""Evaluate a checkpoint on a split of a shard directory, or predict class probabilities for new inputs.

    python launch/evaluate.py MODEL [--shards URL] [--split test] [--samples 32] [--out metrics.json] [--allow-pickle]
    python launch/evaluate.py MODEL --predict INPUT --out predictions.csv|.json [--split test]

MODEL is an exported model folder (launch/export.py) or, with --allow-pickle, a complete checkpoint
directory (runs/x/checkpoints/best-000800: its model.pt is a pickle, so only ones you trust). Its
config gives the model and the shards it was trained on (--shards overrides them). A thin command line
over the Python API (ssl_ebm.load: ssl_ebm/api.py), which also does the normalisation below.
INPUT for --predict is one of
    a shard directory (manifest.json): the examples of --split, with their labels in the output;
    a .npz file with an array `x`: raw examples as in the source data (images uint8 (N, H, W[, C]);
        vectors (N, D), standardised here with the training shards' mean and std; word counts (N, V));
    a .csv file of numbers, one example a row (vectors; a header row is skipped if not numeric).
The predictions file holds, per example: index, predicted class index and name, p(y = k | x) for every
class k, and the label where the input has one. Bad input gives one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssl_ebm import api, data
from ssl_ebm import config as C
from ssl_ebm.metrics import evaluate


class InputError(ValueError):
    """Input that cannot be used; the message says what to change."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="exported model folder, or checkpoint directory URL (.../best-NNNNNN)")
    p.add_argument("--shards", default="", help="shard directory URL (default: the one the model trained on)")
    p.add_argument("--split", default="test", choices=data.SPLITS, help="split to evaluate or predict (shards)")
    p.add_argument("--predict", default="", help="inputs to predict: a shard directory, .npz (array x) or .csv")
    p.add_argument("--out", default="", help="where to write: metrics .json, or predictions .csv / .json")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--allow-pickle", action="store_true", help="load a pickled checkpoint directory (only ones you trust)")
    p.add_argument("--samples", type=int, default=0,
                   help="classify by p(y|x) = E_q(z|x)[softmax f(z)] over this many samples of q(z|x) (eq. 12) "
                        "instead of f(mu(x)) (default 0: f(mu(x)), what training validates)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- inputs


def read_inputs(path: str, split: str) -> tuple[np.ndarray | torch.Tensor, np.ndarray | None]:
    """(x in the data's own units, labels or None)."""
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as f:
                if "x" not in f.files:
                    raise InputError(f"{path}: no array 'x' (it holds {', '.join(f.files) or 'nothing'}); "
                                     "save the inputs as np.savez(path, x=...)")
                x = f["x"]
                y = f["y"] if "y" in f.files else None
        except (OSError, ValueError) as e:
            if isinstance(e, InputError):
                raise
            raise InputError(f"{path}: not a readable .npz file ({e})") from None
        if not np.issubdtype(x.dtype, np.number):
            raise InputError(f"{path}: x is {x.dtype}, expected numbers")
        return x, y
    if path.endswith(".csv"):
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise InputError(f"{path}: cannot read ({e.strerror})") from None
        rows = [r for r in csv.reader(io.StringIO(text)) if r]
        if rows and not _numeric(rows[0]):
            rows = rows[1:]  # a header
        if not rows:
            raise InputError(f"{path}: no rows of numbers")
        for i, r in enumerate(rows):
            if not _numeric(r):
                raise InputError(f"{path}: row {i + 1} is not all numbers: {','.join(r)[:60]!r}")
        widths = {len(r) for r in rows}
        if len(widths) != 1:
            raise InputError(f"{path}: rows have different numbers of columns ({sorted(widths)})")
        return np.asarray(rows, np.float64), None
    if Path(path).is_dir() or "://" in path:
        x, y = api.read_examples(path, split)
        return x, y.numpy()
    if not Path(path).exists():
        raise InputError(f"{path}: no such file or directory")
    raise InputError(f"{path}: unknown input kind; use a shard directory, a .npz file with an array x, or a .csv file")


def _numeric(row: list[str]) -> bool:
    try:
        [float(v) for v in row]
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------- outputs


def write_predictions(out: str, proba: np.ndarray, class_names: list[str], labels: np.ndarray | None) -> None:
    pred = proba.argmax(1) if len(proba) else np.zeros(0, np.int64)
    records = []
    for i, (p, k) in enumerate(zip(proba, pred)):
        r = {"index": i, "pred": int(k), "pred_name": class_names[k]}
        if labels is not None:
            r["label"] = int(labels[i])
        r.update({f"p_{name}": float(v) for name, v in zip(class_names, p)})
        records.append(r)
    if out.endswith(".json"):
        Path(out).write_text(json.dumps({"class_names": class_names, "predictions": records}, indent=1) + "\n")
    elif out.endswith(".csv"):
        fields = ["index", "pred", "pred_name", *(["label"] if labels is not None else []),
                  *[f"p_{n}" for n in class_names]]
        with open(out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(records)
    else:
        raise InputError(f"--out {out!r}: predictions are written to a .csv or .json file")


def posterior_logits(net, samples: int, seed: int = 0):
    """x -> log E_q(z|x)[softmax f(z)] over `samples` draws of z ~ q(z|x) (eq. 12), seeded."""
    gen = torch.Generator().manual_seed(seed)

    def logits(x: torch.Tensor) -> torch.Tensor:
        mu, logvar = net.encoder(x)
        eps = torch.randn((samples, *mu.shape), generator=gen)
        z = mu + torch.exp(0.5 * logvar) * eps  # (S, B, Z)
        proba = torch.softmax(net.prior(z.flatten(0, 1)), dim=-1).view(samples, len(x), -1).mean(0)
        return proba.clamp_min(1e-12).log()

    return logits


def run(args) -> dict | None:
    if args.predict and not args.out:
        raise InputError("--predict needs --out predictions.csv or predictions.json")
    if args.out and not args.out.endswith((".csv", ".json")):
        raise InputError(f"--out {args.out!r}: use a .json file (metrics or predictions) or .csv (predictions)")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.samples < 0 or (args.samples and args.predict):
        raise InputError(f"--samples must be >= 0 and is for metrics, not --predict; got {args.samples}")
    model = api.load(args.checkpoint, allow_pickle=args.allow_pickle, shards=args.shards)
    model.batch_size = args.batch_size
    cfg = model.cfg

    if args.predict:
        x, labels = read_inputs(args.predict, args.split)
        try:
            proba = model.predict_proba(x).numpy()
        except api.ModelError as e:
            raise InputError(f"{args.predict}: {e}") from None
        write_predictions(args.out, proba, model.class_names, labels)
        print(f"{len(proba)} predictions written to {args.out}")
        return None

    shards = args.shards or cfg.data.shards
    if not shards:
        raise InputError("no shards to evaluate on: pass --shards URL")
    manifest = data.read_manifest(shards)
    if tuple(manifest["x_shape"]) != tuple(cfg.model.x_shape):
        raise InputError(f"{shards}: examples have shape {manifest['x_shape']}, the model takes "
                         f"{list(cfg.model.x_shape)}")
    batches = data.eval_batches(shards, args.split, batch_size=args.batch_size)
    with torch.no_grad():  # the shards are in the model's units already
        rule = posterior_logits(model.net, args.samples) if args.samples else model.net.predict_logits
        metrics = evaluate(rule, batches, cfg.model.num_classes, torch.device("cpu"))
    metrics = {"checkpoint": args.checkpoint, "shards": shards, "split": args.split,
               "rule": f"posterior mean over {args.samples} samples" if args.samples else "f(mu(x))", **metrics}
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics))
    return metrics


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (InputError, api.ModelError, C.ConfigError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
