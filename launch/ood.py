"""Out-of-distribution detection: AUROC of each score of ssl_ebm.Model.score for an in/out pair of datasets.

    python launch/ood.py MODEL --in SHARDS --out SHARDS [--split test] [--limit N] [--json ood.json] [--allow-pickle]

MODEL is an exported folder or (with --allow-pickle) a checkpoint directory; --in defaults to the shards
the model trained on. Both shard directories must hold examples of the model's shape; each is read in its
own units (its own normalisation undone) and fed to the model as new data. Scores, higher = less like the
training data: "neg_F" -F(mu(x)), "energy" -log p_alpha(mu(x)) (the same with the base measure p0's term),
"neg_elbo" the negative ELBO under the EBM prior, "neg_max_softmax" the classifier's baseline. AUROC: "out" is the positive class (0.5 = chance, 1 = perfect separation).
Bad input gives one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssl_ebm import api, data  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="exported model folder URL, or a checkpoint directory with --allow-pickle")
    p.add_argument("--in", dest="inside", default="", help="in-distribution shard directory (default: the model's)")
    p.add_argument("--out", dest="outside", required=True, help="out-of-distribution shard directory")
    p.add_argument("--split", default="test", choices=data.SPLITS, help="split of both shard directories")
    p.add_argument("--limit", type=int, default=0, help="first N examples of each (0 = all)")
    p.add_argument("--json", default="", help="write the table here as JSON")
    p.add_argument("--allow-pickle", action="store_true", help="load a pickled checkpoint directory (only ones you trust)")
    return p.parse_args(argv)


def run(args) -> dict:
    if args.limit < 0:
        raise api.ModelError(f"--limit must be >= 0, got {args.limit}")
    model = api.load(args.model, allow_pickle=args.allow_pickle)
    inside = args.inside or model.cfg.data.shards
    scores = {}
    for name, url in (("in", inside), ("out", args.outside)):
        x, _ = api.read_examples(url, args.split, limit=args.limit)
        try:
            scores[name] = model.score(x)
        except api.ModelError as e:
            raise api.ModelError(f"{url}: {e}") from None
    table = {k: api.auroc(scores["in"][k], scores["out"][k]) for k in api.SCORES}
    report = {"model": args.model, "in": inside, "out": args.outside, "split": args.split,
              "count_in": len(scores["in"]["neg_F"]), "count_out": len(scores["out"]["neg_F"]), "auroc": table}
    print(f"{'score':<16} AUROC  ({report['count_in']} in: {inside}; {report['count_out']} out: {args.outside})")
    for k, v in table.items():
        print(f"{k:<16} {v:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
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
