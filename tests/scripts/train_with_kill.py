"""launch/train.py that kills itself with SIGKILL (a real kill -9) at a chosen moment, for the fault campaign
(tests/scripts/fault_campaign.py):

    python tests/scripts/train_with_kill.py KILL FAULT --config ... [overrides]

KILL is `none`, `timer:SECONDS:RANK`, or `POINT:AT:RANK:COUNT`; only process RANK kills itself:
    timer:SECONDS:RANK     a timer started at the first step fires after SECONDS, wherever the run is then
                           (in a step, a save, a pruning, an evaluation, the watchdog's roll-back, the teardown)
    step:AT:RANK:0         at the start of step AT (before its negatives are drawn)
    step:AT:RANK:1         inside step AT, after forward and backward, before the optimizer's update
    save:AT:RANK:COUNT     from the start of step AT, after COUNT store operations (inside its checkpoint saves)
    upload:AT:RANK:COUNT   from the start of step AT, the COUNT-th file this process writes to the store (a
                           checkpoint file, or under ZeRO an engine shard) is cut: half of its bytes reach the
                           store, then the kill
    prune:AT:RANK:COUNT    inside the first pruning of step AT's saves (best-* after a new best, else old step-*):
                           after COUNT - 1 of its store operations the next one is cut (a directory removal: its
                           COMPLETE and half of its files go, then the kill); COUNT 0 kills as the pruning
                           starts, a COUNT beyond its operations as it ends
    restore:AT:RANK:COUNT  inside the watchdog's recovery at step AT (its checks of the restore points, the
                           roll-back's deletes and loads), after COUNT store operations
A store operation (ssl_ebm/checkpoint.py) is one file written or read, or one COMPLETE marker removed; for
`upload`, one file written; for `prune`, one meta.json read or one directory removed. FAULT is `none` or
`AT:LR`: from update AT on the prior's learning rate is LR (as train_with_fault.py), a divergence the watchdog
rolls back. The resumed run is the same command with KILL `none`. A run that is not killed prints
`lifetime SECONDS, first step at SECONDS` (from this script's start): the campaign draws its timers' delays
within the time from the first step to the end.
"""

import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

born = time.monotonic()
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))

import train  # noqa: E402  (launch/train.py)
from ssl_ebm import health  # noqa: E402
from ssl_ebm import state as state_module  # noqa: E402
from ssl_ebm.checkpoint import MARKER, CheckpointStore  # noqa: E402

first_step = []  # seconds from this script's start to its first step
armed = {"on": False, "left": 0, "cut": None}  # cut: which operations are cut halfway ("write", "remove")


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(count: int, cut: str | None = None) -> None:
    armed.update(on=True, left=count, cut=cut)
    if count <= 0:
        die()


def fatal(kind: str) -> bool:
    """Whether this operation (of `kind`) is the one that is cut, the armed count being reached with it."""
    return armed["on"] and armed["cut"] == kind and armed["left"] <= 1


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


# Cut operations: the store's own methods do the first half of the work, then the kill.
write_bytes, upload, remove = CheckpointStore.write_bytes, CheckpointStore.upload, CheckpointStore.remove


def write_bytes_cut(self, name, filename, data):
    if fatal("write"):
        if filename != MARKER:  # (an empty marker cut halfway is not written at all)
            write_bytes(self, name, filename, data[:len(data) // 2])
        die()
    write_bytes(self, name, filename, data)
    if armed["cut"] == "write":
        tick()


def upload_cut(self, local, name, filename):
    if fatal("write"):
        with tempfile.NamedTemporaryFile() as half:
            half.write(Path(local).read_bytes()[:Path(local).stat().st_size // 2])
            half.flush()
            upload(self, half.name, name, filename)
        die()
    upload(self, local, name, filename)
    if armed["cut"] == "write":
        tick()


def remove_one_cut(self, name):
    """One directory of `remove`: cut (its marker, then half of its files), or whole and counted."""
    if not fatal("remove"):
        remove(self, [name])
        return tick()
    self._unmark(name)
    files = sorted(self.fs.find(self._path(name)))
    for path in files[:max(1, len(files) // 2)]:
        self.fs.rm_file(path)
    die()


def remove_cut(self, names):
    for name in names:
        remove_one_cut(self, name)


def start_timer(seconds: float) -> None:
    timer = threading.Timer(seconds, die)
    timer.daemon = True  # a run that ends first is not killed at its exit
    timer.start()


def kill_hook(spec: str):
    """The before_step hook and patches for KILL (see the module docstring); None for `none`."""
    if spec == "none":
        return None
    if spec.startswith("timer:"):
        _, seconds, rank = spec.split(":")

        def timer_at_first_step(done: int, state) -> None:
            if state.acc.process_index == int(rank) and not first_step:
                start_timer(float(seconds))
        return timer_at_first_step
    point, at, rank, count = spec.split(":")
    at, rank, count = int(at), int(rank), int(count)
    if point == "upload":
        CheckpointStore.write_bytes, CheckpointStore.upload = write_bytes_cut, upload_cut
    elif point == "prune":  # a directory removed is one operation (remove_cut), a meta.json read another
        CheckpointStore.read_json = counted(CheckpointStore.read_json)
        patch_pruning(at, rank, count)
    else:
        for op in ("_unmark", "write_bytes", "read_torch", "read_json"):
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
        elif point == "upload":
            arm(count, cut="write")
        elif point == "step" and count == 0:
            die()
        elif point == "step":
            step = state.optimizer.step

            def step_then_kill(*args, **kwargs):
                die()
                return step(*args, **kwargs)

            state.optimizer.step = step_then_kill
    return hook


def patch_pruning(at: int, rank: int, count: int) -> None:
    """Arm inside both prunings of the saves at step `at` (step-* by CheckpointStore.prune, best-* by
    resume.prune_best, which state.py calls); SIGKILL at their end if the count was not reached."""
    CheckpointStore.remove = remove_cut
    done = {"step": 0}  # the step whose periodic actions run now

    def armed_inside(prune):
        def wrapper(store, *args, **kwargs):
            if done["step"] != at or int(os.environ.get("RANK", 0)) != rank:
                return prune(store, *args, **kwargs)
            arm(count, cut="remove")
            out = prune(store, *args, **kwargs)
            die()
            return out
        return wrapper

    CheckpointStore.prune = armed_inside(CheckpointStore.prune)
    state_module.prune_best = armed_inside(state_module.prune_best)
    checkpoint, evaluate = train.checkpoint, train.evaluate_and_keep_best

    def at_step(action):
        def wrapper(run, step, *args, **kwargs):
            done["step"] = step
            return action(run, step, *args, **kwargs)
        return wrapper

    train.checkpoint, train.evaluate_and_keep_best = at_step(checkpoint), at_step(evaluate)


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
    if not first_step:
        first_step.append(time.monotonic() - born)


code = train.main(sys.argv[3:], before_step=before_step)
print(f"lifetime {time.monotonic() - born:.2f}, first step at {(first_step or [0.0])[0]:.2f}", flush=True)
train.runtime.exit_process(code)
