"""Export a checkpoint as a portable model folder: config.yaml, manifest.json, model.safetensors.

    python launch/export.py CHECKPOINT OUT --allow-pickle [--shards URL]

CHECKPOINT is a complete checkpoint directory (its model.pt is a pickle: --allow-pickle says you trust it);
OUT any fsspec URL (a folder, memory://, s3://). The folder loads with `ssl_ebm.load(OUT)` without
unpickling anything, and carries the manifest facts (classes, normalisation, vocabulary) it needs, so it no
longer depends on the training shards. --shards: where the training shards are, if they have moved.
Bad input gives one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssl_ebm import api  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint directory URL (.../best-NNNNNN)")
    p.add_argument("out", help="URL of the folder to write")
    p.add_argument("--shards", default="", help="the training shards, if they are no longer where the config says")
    p.add_argument("--allow-pickle", action="store_true", help="read the pickled checkpoint (only ones you trust)")
    args = p.parse_args(argv)
    try:
        model = api.load(args.checkpoint, allow_pickle=args.allow_pickle, shards=args.shards)
        api.export(model, args.out)
    except api.ModelError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"{model!r} exported to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
