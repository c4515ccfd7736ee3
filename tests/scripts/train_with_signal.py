"""launch/train.py that sends itself a stop signal while drawing negatives, for the preemption tests:

    python tests/scripts/train_with_signal.py N SIGNAL --config ... [overrides]

SIGNAL (TERM or USR1) arrives during the N-th draw of negatives (1-based), i.e. inside the N-th
micro-batch: with train.grad_accum=2 and N odd, in the middle of an accumulation window.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))

import train  # noqa: E402  (launch/train.py)

at, sig = int(sys.argv[1]), getattr(signal, f"SIG{sys.argv[2]}")
draws = 0
sample_negatives = train.sample_negatives


def signalling_sample_negatives(*args, **kwargs):
    global draws
    draws += 1
    if draws == at:
        os.kill(os.getpid(), sig)
    return sample_negatives(*args, **kwargs)


train.sample_negatives = signalling_sample_negatives
train.runtime.exit_process(train.main(sys.argv[3:]))
