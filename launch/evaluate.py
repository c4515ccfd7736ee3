"""Evaluate a checkpoint on a split of a shard directory, or predict class probabilities for new inputs.

    python launch/evaluate.py CHECKPOINT [--shards URL] [--split test] [--samples 32] [--out metrics.json]
    python launch/evaluate.py CHECKPOINT --predict INPUT --out predictions.csv|.json [--split test]

CHECKPOINT is a complete checkpoint directory URL (runs/x/checkpoints/best-000800 or step-001000).
Its config.yaml gives the model and the shards it was trained on (--shards overrides them).
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

from ssl_ebm import config as C
from ssl_ebm import data
from ssl_ebm.checkpoint import CheckpointError, CheckpointStore, load_weights
from ssl_ebm.metrics import evaluate
from ssl_ebm.model import LatentEBM


class InputError(ValueError):
    """Input that cannot be used; the message says what to change."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="complete checkpoint directory URL (.../step-NNNNNN or .../best-NNNNNN)")
    p.add_argument("--shards", default="", help="shard directory URL (default: the one the checkpoint trained on)")
    p.add_argument("--split", default="test", choices=data.SPLITS, help="split to evaluate or predict (shards)")
    p.add_argument("--predict", default="", help="inputs to predict: a shard directory, .npz (array x) or .csv")
    p.add_argument("--out", default="", help="where to write: metrics .json, or predictions .csv / .json")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--samples", type=int, default=0,
                   help="classify by p(y|x) = E_q(z|x)[softmax f(z)] over this many samples of q(z|x) (eq. 12) "
                        "instead of f(mu(x)) (default 0: f(mu(x)), what training validates)")
    return p.parse_args(argv)


def load_model(url: str) -> tuple[LatentEBM, C.Config]:
    parent, name = url.rstrip("/").rsplit("/", 1) if "/" in url.rstrip("/") else (".", url.rstrip("/"))
    store = CheckpointStore(parent)
    weights = load_weights(url)  # checks COMPLETE
    if not store.exists(name, "config.yaml"):
        raise CheckpointError(f"{url!r} has no config.yaml; it was not written by launch/train.py")
    with store.fs.open(store._path(name, "config.yaml"), "r") as f:
        cfg = C.from_dict(C.Config, __import__("yaml").safe_load(f.read()))
    model = LatentEBM(cfg.model)
    model.load_state_dict(weights)
    return model.eval(), cfg


# ----------------------------------------------------------------------------- inputs


def _standardise(x: np.ndarray, manifest: dict | None) -> np.ndarray:
    norm = (manifest or {}).get("normalisation") or {}
    if "mean" in norm:
        x = (x - np.asarray(norm["mean"], np.float32)) / np.asarray(norm["std"], np.float32)
    return x.astype(np.float32)


def _to_model_input(x: np.ndarray, cfg: C.Config, manifest: dict | None, where: str) -> torch.Tensor:
    """Raw examples (as the source data holds them) -> float32 (N, *model.x_shape), as the loaders give."""
    shape = tuple(cfg.model.x_shape)
    if len(shape) == 3:  # images: uint8 (N, H, W[, C]) -> (N, C, H, W) in [-1, 1]
        c, h, w = shape
        if x.ndim == 3 and c == 1:
            x = x[..., None]
        if x.ndim != 4 or x.shape[1:] != (h, w, c):
            raise InputError(f"{where}: x has shape {x.shape}; expected images (N, {h}, {w}{'' if c == 1 else ', 3'}) "
                             "as in the source data")
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32) / 127.5 - 1.0)
    if x.ndim != 2 or x.shape[1] != shape[0]:
        raise InputError(f"{where}: x has shape {x.shape}; expected (N, {shape[0]}) for this model")
    if not np.isfinite(x).all():
        raise InputError(f"{where}: x holds NaN or infinite values")
    if (manifest or {}).get("kind") == "counts":
        return torch.from_numpy(x.astype(np.float32))
    return torch.from_numpy(_standardise(x.astype(np.float32), manifest))


def read_inputs(path: str, cfg: C.Config, manifest: dict | None, split: str) -> tuple[torch.Tensor, np.ndarray | None]:
    """(x as the model takes it, labels or None)."""
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
        return _to_model_input(x, cfg, manifest, path), y
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
        return _to_model_input(np.asarray(rows, np.float64), cfg, manifest, path), None
    if Path(path).is_dir() or "://" in path:
        xs, ys = [], []
        for b in data.eval_batches(path, split, batch_size=1024):
            xs.append(b["x"])
            ys.append(b["y"].numpy())
        x = torch.cat(xs) if xs else torch.empty(0, *cfg.model.x_shape)
        if tuple(x.shape[1:]) != tuple(cfg.model.x_shape):
            raise InputError(f"{path}: examples have shape {tuple(x.shape[1:])}, the model takes "
                             f"{tuple(cfg.model.x_shape)}")
        return x, np.concatenate(ys) if ys else np.zeros(0, np.int64)
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


@torch.no_grad()
def predict_proba(model: LatentEBM, x: torch.Tensor, batch_size: int) -> np.ndarray:
    return np.concatenate([model.predict_proba(x[i:i + batch_size]).numpy() for i in range(0, len(x), batch_size)]) \
        if len(x) else np.zeros((0, model.cfg.num_classes), np.float32)


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


def posterior_logits(model: LatentEBM, samples: int, seed: int = 0):
    """x -> log E_q(z|x)[softmax f(z)] over `samples` draws of z ~ q(z|x) (eq. 12), seeded."""
    gen = torch.Generator().manual_seed(seed)

    def logits(x: torch.Tensor) -> torch.Tensor:
        mu, logvar = model.encoder(x)
        eps = torch.randn((samples, *mu.shape), generator=gen)
        z = mu + torch.exp(0.5 * logvar) * eps  # (S, B, Z)
        proba = torch.softmax(model.prior(z.flatten(0, 1)), dim=-1).view(samples, len(x), -1).mean(0)
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
    model, cfg = load_model(args.checkpoint)
    shards = args.shards or cfg.data.shards
    manifest = None
    try:
        manifest = data.read_manifest(shards) if shards else None
    except data.DataError:
        if not args.predict or args.shards:
            raise
    class_names = (manifest or {}).get("class_names") or [str(k) for k in range(cfg.model.num_classes)]
    if len(class_names) != cfg.model.num_classes:
        raise InputError(f"{shards}: {len(class_names)} classes, the checkpoint has {cfg.model.num_classes}")

    if args.predict:
        inputs_manifest = manifest
        if Path(args.predict).is_dir() or "://" in args.predict:
            inputs_manifest = data.read_manifest(args.predict)
        x, labels = read_inputs(args.predict, cfg, inputs_manifest, args.split)
        proba = predict_proba(model, x, args.batch_size)
        write_predictions(args.out, proba, class_names, labels)
        print(f"{len(proba)} predictions written to {args.out}")
        return None

    if manifest is None:
        raise InputError("no shards to evaluate on: pass --shards URL")
    if tuple(manifest["x_shape"]) != tuple(cfg.model.x_shape):
        raise InputError(f"{shards}: examples have shape {manifest['x_shape']}, the model takes "
                         f"{list(cfg.model.x_shape)}")
    batches = data.eval_batches(shards, args.split, batch_size=args.batch_size)
    with torch.no_grad():
        rule = posterior_logits(model, args.samples) if args.samples else model.predict_logits
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
    except (InputError, C.ConfigError, data.DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
