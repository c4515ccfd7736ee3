"""launch/train.py with something happening inside one micro-batch, for the gradient accumulation tests:

    python tests/scripts/train_with_micro_fault.py N WHAT --config ... [overrides]

During the N-th draw of negatives (1-based), i.e. inside the N-th micro-batch (with train.grad_accum=2
and N odd, the first of a window; N even, the last), WHAT happens:
    TERM, USR1   the process sends itself that signal (a stop request)
    FLING        that micro-batch's negatives come back 1000 times too far out (the watchdog's chain check
                 fails there, after the window's earlier micro-batches have run their backward)
    NAN          that micro-batch's negatives come back NaN (its loss is not finite; the bank keeps its chains)
Works under `accelerate launch` too: every process does the same.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))

import torch  # noqa: E402
import train  # noqa: E402  (launch/train.py)

at, what = int(sys.argv[1]), sys.argv[2]
draws = 0
sample_negatives = train.sample_negatives


def sample_negatives_with_fault(*args, **kwargs):
    global draws
    draws += 1
    if draws == at and what in ("TERM", "USR1"):
        os.kill(os.getpid(), getattr(signal, f"SIG{what}"))
    z_neg = sample_negatives(*args, **kwargs)
    if draws == at and what in ("FLING", "NAN"):
        return 1000 * z_neg if what == "FLING" else torch.full_like(z_neg, float("nan"))
    return z_neg


train.sample_negatives = sample_negatives_with_fault
train.runtime.exit_process(train.main(sys.argv[3:]))
