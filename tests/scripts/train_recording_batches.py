"""launch/train.py that also records what each process's training stream yields, for the data-position tests:

    python tests/scripts/train_recording_batches.py DIR --config ... [overrides]

Each process appends one line per micro-batch it draws to DIR/rank-<R>.txt: the sha1 of the batch's x_u,
x_l and y_l bytes (`batch_digest`). Works under `accelerate launch` too.
"""

import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))

import train  # noqa: E402  (launch/train.py)

train_batches = train.data.train_batches


def batch_digest(batch: dict) -> str:
    sha = hashlib.sha1()
    for key in ("x_u", "x_l", "y_l"):
        sha.update(batch[key].contiguous().numpy().tobytes())
    return sha.hexdigest()


def recorded(*args, **kwargs):
    path = Path(sys.argv[1]) / f"rank-{kwargs.get('rank', 0)}.txt"
    for batch in train_batches(*args, **kwargs):
        with path.open("a") as f:
            f.write(batch_digest(batch) + "\n")
        yield batch


if __name__ == "__main__":
    Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
    train.data.train_batches = recorded
    train.runtime.exit_process(train.main(sys.argv[2:]))
