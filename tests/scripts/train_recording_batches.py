"""launch/train.py that also records what each process's training stream yields, for the data-position tests:

    python tests/scripts/train_recording_batches.py DIR --config ... [overrides]

Each process appends one line per micro-batch its loop receives to DIR/rank-<R>.txt: the sha1 of the batch's
x_u, x_l and y_l bytes (`batch_digest`). Recorded where the loop takes it (data.DeviceBatches, which reads
one batch ahead of the step), not where the host stream yields it, so a batch read ahead of a stop counts
only if a step used it. Works under `accelerate launch` too.
"""

import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))

import train  # noqa: E402  (launch/train.py)

train_batches, DeviceBatches = train.data.train_batches, train.data.DeviceBatches


def batch_digest(batch: dict) -> str:
    sha = hashlib.sha1()
    for key in ("x_u", "x_l", "y_l"):
        sha.update(batch[key].contiguous().numpy().tobytes())
    return sha.hexdigest()


def with_rank(*args, **kwargs):
    """train_batches, remembering which rank's stream the loop asked for."""
    stream = train_batches(*args, **kwargs)
    return stream, kwargs.get("rank", 0)


class RecordedBatches(DeviceBatches):
    def __init__(self, stream_and_rank, *args, **kwargs):
        stream, rank = stream_and_rank
        super().__init__(stream, *args, **kwargs)
        self.path = Path(sys.argv[1]) / f"rank-{rank}.txt"

    def __next__(self) -> dict:
        batch = super().__next__()
        with self.path.open("a") as f:
            f.write(batch_digest({k: v.cpu() for k, v in batch.items()}) + "\n")
        return batch


if __name__ == "__main__":
    Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
    train.data.train_batches, train.data.DeviceBatches = with_rank, RecordedBatches
    train.runtime.exit_process(train.main(sys.argv[2:]))
