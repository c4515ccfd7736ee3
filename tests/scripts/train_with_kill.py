"""launch/train.py that kills itself with SIGKILL (a real kill -9) at a chosen moment, for the fault campaign
(tests/scripts/fault_campaign.py):

    python tests/scripts/train_with_kill.py KILL FAULT --config ... [overrides]

KILL is `none` or `POINT:AT:RANK:COUNT`; only process RANK kills itself:
    step:AT:RANK:0         at the start of step AT (before its negatives are drawn)
    step:AT:RANK:1         inside step AT, after forward and backward, before the optimizer's update
    save:AT:RANK:COUNT     inside the checkpoint saves of step AT, after COUNT store operations
    restore:AT:RANK:COUNT  inside the watchdog's recovery at step AT (its checks of the restore points, the
                           roll-back's deletes and loads), after COUNT store operations
A store operation is one file written, one file read, or one COMPLETE marker removed (ssl_ebm/checkpoint.py).
FAULT is `none` or `AT:LR`: from update AT on the prior's learning rate is LR (as train_with_fault.py), a
divergence the watchdog rolls back. The resumed run is the same command with KILL `none`.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))

import train  # noqa: E402  (launch/train.py)
from ssl_ebm import health  # noqa: E402
from ssl_ebm.checkpoint import CheckpointStore  # noqa: E402

OPS = ("_unmark", "write_bytes", "read_torch", "read_json")  # the store operations counted
armed = {"on": False, "left": 0}


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def tick() -> None:
    """One store operation finished: SIGKILL once the armed count is reached."""
    if armed["on"]:
        armed["left"] -= 1
        if armed["left"] <= 0:
            die()


def counted(method):
    def wrapper(*args, **kwargs):
        out = method(*args, **kwargs)
        tick()
        return out
    return wrapper


def arm(count: int) -> None:
    armed.update(on=True, left=count)
    if count <= 0:
        die()


def kill_hook(spec: str):
    """The before_step hook and patches for KILL (see the module docstring); None for `none`."""
    if spec == "none":
        return None
    point, at, rank, count = spec.split(":")
    at, rank, count = int(at), int(rank), int(count)
    for op in OPS:
        setattr(CheckpointStore, op, counted(getattr(CheckpointStore, op)))
    if point == "restore":
        recover = health.Watchdog.recover

        def recover_then_kill(self, done, *args, **kwargs):
            if done == at and self.acc.process_index == rank:
                arm(count)
            return recover(self, done, *args, **kwargs)

        health.Watchdog.recover = recover_then_kill

    def hook(done: int, state) -> None:
        if done != at or state.acc.process_index != rank:
            return
        if point == "save":
            arm(count)
        elif point == "step" and count == 0:
            die()
        elif point == "step":
            step = state.optimizer.step

            def step_then_kill(*args, **kwargs):
                die()
                return step(*args, **kwargs)

            state.optimizer.step = step_then_kill
    return hook


def fault_hook(spec: str):
    if spec == "none":
        return None
    at, lr = spec.split(":")

    def hook(done: int, state) -> None:
        if done == int(at):
            state.set_prior_lr(float(lr))
    return hook


kill, fault = kill_hook(sys.argv[1]), fault_hook(sys.argv[2])


def before_step(done: int, state) -> None:
    for hook in (fault, kill):
        if hook is not None:
            hook(done, state)


train.runtime.exit_process(train.main(sys.argv[3:], before_step=before_step))
