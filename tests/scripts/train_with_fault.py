"""launch/train.py with a fault injected, for the watchdog tests:

    python tests/scripts/train_with_fault.py AT LR --config ... [overrides]

From update AT on, the prior's learning rate is LR (its base rate: it stays until a restore brings back
the checkpoint's schedule, a bad setting that the watchdog's roll-back undoes). Works under
`accelerate launch` too: every process injects the same fault.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))

import train  # noqa: E402  (launch/train.py)

at, lr = int(sys.argv[1]), float(sys.argv[2])


def fault(done: int, state) -> None:
    if done == at:
        state.set_prior_lr(lr)


train.runtime.exit_process(train.main(sys.argv[3:], before_step=fault))
