"""Class-conditional generation from a trained model, and how often an independent classifier agrees.

    python launch/generate.py MODEL --per-class 16 [--out DIR] [--allow-pickle]
    python launch/generate.py MODEL --per-class 100 --check-with cnn [--shards URL] [--seed 0]

MODEL is an exported folder or (with --allow-pickle) a checkpoint directory. For each class k,
--per-class latents are drawn by Langevin on f_k(z) - |z|^2 / (2 sigma0^2) from p0 (ssl_ebm.Model.sample)
and decoded by the generator. --guidance w > 1 samples log p(z) + w log p(y=k|z) instead (classifier
guidance: surer, less varied samples); several values are checked by one classifier (check.json: by_guidance). Written to --out (default: the current directory):
    images:  samples.png, one row per class;
    vectors: samples.csv, one row per sample: class, class name, the features in the source data's units;
    text:    top_words.txt, the --top-words most probable words per class (mean over that class's samples).
--check-with trains a classifier on the FULL labelled training set of the shards (labelled, unlabelled and
validation splits, all with their true labels: not the model, not only its labelled examples), reports its
test accuracy, the fraction of the samples generated for class k that it assigns to k, and, for reference,
its accuracy on the reconstructions g(mu(x)) of the test examples (check.json):
    cnn:    a small convolutional net (images only), 5 epochs of Adam, seeded;
    logreg: scikit-learn logistic regression on the model-unit features.
Bad input gives one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssl_ebm import api, data, logs  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="exported model folder URL, or a checkpoint directory with --allow-pickle")
    p.add_argument("--per-class", type=int, default=16, help="samples per class")
    p.add_argument("--out", default=".", help="folder for samples.png / samples.csv / top_words.txt and check.json")
    p.add_argument("--steps", type=int, default=200, help="Langevin steps from p0")
    p.add_argument("--step-size", type=float, default=0.0, help="Langevin step size (default: the training config's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0],
                   help="w: sample log p(z) + w log p(y|z); 1 (default) is the model's own p(z|y), w > 1 sharper; "
                   "several values give one file each (samples_w<w>.png), all checked by the same classifier")
    p.add_argument("--top-words", type=int, default=10, help="text: words listed per class")
    p.add_argument("--check-with", default="", choices=["", "cnn", "logreg"],
                   help="measure the samples with an independent classifier trained on the full labelled training set")
    p.add_argument("--shards", default="", help="shard directory for --check-with (default: the model's training shards)")
    p.add_argument("--allow-pickle", action="store_true", help="load a pickled checkpoint directory (only ones you trust)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the independent classifier


class SmallCNN(torch.nn.Module):
    """Two conv blocks and a linear layer: about 99% on MNIST, nothing shared with ssl-ebm's nets."""

    def __init__(self, channels: int, size: int, num_classes: int):
        super().__init__()
        c = torch.nn
        self.net = c.Sequential(c.Conv2d(channels, 32, 3, padding=1), c.ReLU(), c.MaxPool2d(2),
                                c.Conv2d(32, 64, 3, padding=1), c.ReLU(), c.MaxPool2d(2), c.Flatten(),
                                c.Linear(64 * (size // 4) ** 2, num_classes))

    def forward(self, x):
        return self.net(x)


def _split(url: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for b in data.eval_batches(url, split, batch_size=1024):
        xs.append(b["x"])
        ys.append(b["y"])
    return torch.cat(xs), torch.cat(ys)


def train_checker(kind: str, url: str, seed: int):
    """(predict(x_model_units) -> labels, test accuracy, training-set size, test split) of an independent
    classifier."""
    manifest = data.read_manifest(url)
    parts = [_split(url, s) for s in ("labelled", "unlabelled", "val") if s in manifest["splits"]]
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    x_test, y_test = _split(url, "test")
    if kind == "cnn":
        if manifest["kind"] != "image":
            raise api.ModelError(f"--check-with cnn is for images; {url} holds {manifest['kind']} data: use logreg")
        torch.manual_seed(seed)
        c, h, _ = manifest["x_shape"]
        net = SmallCNN(c, h, manifest["num_classes"])
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(5):
            for idx in torch.randperm(len(x), generator=gen).split(128):
                loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()

        @torch.no_grad()
        def predict(v: torch.Tensor) -> torch.Tensor:
            return torch.cat([net(b).argmax(1) for b in v.split(1024)]) if len(v) else torch.zeros(0, dtype=torch.int64)
    else:
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(max_iter=1000, random_state=seed).fit(x.flatten(1).numpy(), y.numpy())

        def predict(v: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(clf.predict(v.flatten(1).numpy())) if len(v) else torch.zeros(0, dtype=torch.int64)
    acc = float((predict(x_test) == y_test).float().mean())
    return predict, acc, len(x), (x_test, y_test)


# ----------------------------------------------------------------------------- outputs


def write_samples(model: api.Model, x: torch.Tensor, y: torch.Tensor, out: Path, per_class: int, top_words: int,
                  suffix: str = "") -> Path:
    if model.kind == "image":
        x_BCHW = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        path = out / f"samples{suffix}.png"
        logs.save_png(str(path), logs.image_grid(x_BCHW, nrow=per_class))
    elif model.kind == "vector":
        names = model.manifest.get("feature_names") or [f"x{i}" for i in range(x.shape[1])]
        path = out / f"samples{suffix}.csv"
        rows = [",".join(["class", "class_name", *names])]
        rows += [",".join([str(int(k)), model.class_names[k], *(f"{v:.6g}" for v in row)]) for k, row in zip(y, x.tolist())]
        path.write_text("\n".join(rows) + "\n")
    else:
        vocab = model.manifest.get("vocab") or [str(i) for i in range(x.shape[1])]
        path = out / f"top_words{suffix}.txt"
        lines = []
        for k, name in enumerate(model.class_names):
            p = x[y == k].mean(0)
            lines.append(f"{name}: " + " ".join(vocab[i] for i in p.topk(min(top_words, len(p))).indices.tolist()))
        path.write_text("\n".join(lines) + "\n")
    return path


def spread(x: torch.Tensor, y: torch.Tensor) -> float:
    """How varied samples are: the mean over classes of the mean pairwise distance (model units, RMS per
    feature) between examples of one class. check.json gives it for the samples of each guidance value and
    for as many real test examples per class: sharper guidance that only repeats a few prototypes shows up
    as a spread far below the test set's."""
    out = []
    for k in y.unique():
        v = x[y == k].flatten(1).float()
        if len(v) > 1:
            d = torch.cdist(v, v) / v.shape[1] ** 0.5
            out.append(d.sum() / (len(v) * (len(v) - 1)))
    return float(torch.stack(out).mean()) if out else 0.0


def run(args) -> dict:
    if args.per_class < 1:
        raise api.ModelError(f"--per-class must be >= 1, got {args.per_class}")
    if args.steps < 1:
        raise api.ModelError(f"--steps must be >= 1, got {args.steps}")
    bad = [w for w in args.guidance if not w > 0]
    if bad:
        raise api.ModelError(f"--guidance must be > 0 (1 = the model's own p(z|y)), got {bad[0]}")
    t0 = time.time()
    model = api.load(args.model, allow_pickle=args.allow_pickle)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    y = torch.arange(model.num_classes).repeat_interleave(args.per_class)
    samples = []  # (w, x, path) per guidance value
    for w in args.guidance:
        z = model.sample(len(y), y=y, steps=args.steps, step_size=args.step_size or None, seed=args.seed, guidance=w)
        x = model.generate(z)
        path = write_samples(model, x, y, out, args.per_class, args.top_words,
                             suffix="" if len(args.guidance) == 1 else f"_w{w:g}")
        samples.append((w, x, path))
        print(f"{len(y)} samples ({args.per_class} per class, guidance {w:g}) written to {path}")
    report = {"model": args.model, "per_class": args.per_class, "steps": args.steps, "seed": args.seed,
              "guidance": args.guidance[0], "written": str(samples[0][2])}
    if args.check_with:
        shards = args.shards or model.cfg.data.shards
        predict, test_acc, n_train, (x_test, y_test) = train_checker(args.check_with, shards, args.seed)
        by_guidance = []
        for w, x, path in samples:
            x_model = model.to_model_units(x)
            hit = predict(x_model) == y
            by_guidance.append({"guidance": w, "written": str(path), "conditional_accuracy": float(hit.float().mean()),
                                "per_class": {name: float(hit[y == k].float().mean())
                                              for k, name in enumerate(model.class_names)},
                                "spread": spread(x_model, y)})
        # The same classifier on g(mu(x)) of the test examples: what the generator can do from latents
        # the encoder puts where the data is, against which to read the prior's samples.
        with torch.no_grad():
            recon = model.to_model_units(model.generate(torch.cat([model.net.encoder(b)[0] for b in x_test.split(1024)])))
        recon_acc = float((predict(recon) == y_test).float().mean())
        per_k = torch.cat([torch.nonzero(y_test == k).flatten()[:args.per_class] for k in range(model.num_classes)])
        report.update(check_with=args.check_with, shards=shards, checker_train_examples=n_train,
                      checker_test_accuracy=test_acc, conditional_accuracy=by_guidance[0]["conditional_accuracy"],
                      per_class=by_guidance[0]["per_class"], reconstruction_accuracy=recon_acc,
                      test_spread=spread(x_test[per_k], y_test[per_k]),
                      by_guidance=by_guidance)
        (out / "check.json").write_text(json.dumps(report, indent=2) + "\n")
        found = "; ".join(f"guidance {g['guidance']:g}: {100 * g['conditional_accuracy']:.1f}% (spread {g['spread']:.3f})"
                          for g in by_guidance)
        print(f"independent {args.check_with} (trained on {n_train} labelled examples, test accuracy "
              f"{100 * test_acc:.1f}%) assigns to their intended class, of the {len(y)} samples, {found} "
              f"(and {100 * recon_acc:.1f}% of the test examples' reconstructions g(mu(x)) to their class; the "
              f"test examples' own spread {report['test_spread']:.3f})")
    report["seconds"] = round(time.time() - t0, 1)
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (api.ModelError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
