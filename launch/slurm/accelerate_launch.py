"""`accelerate launch` for batch jobs: the same arguments, plus what preemption needs.

    python launch/slurm/accelerate_launch.py --config_file configs/accelerate/zero2.yaml \
        --num_processes 8 launch/train.py --config configs/cifar10.yaml

Plain `accelerate launch` falls short in two ways when SLURM stops a job:
- it exits with status 1 whenever a process fails, so the trainers' status 75 ("checkpoint written,
  requeue me", `ssl_ebm.runtime.Preemption.EXIT_CODE`) is lost; this passes it on;
- it dies on SIGUSR1 (SLURM's time-limit warning) and kills the trainers 30 s after SIGTERM, whatever
  their checkpoint still needs, and the trainers run in their own sessions, so a signal to the launcher
  does not reach them. This forwards SIGUSR1 and SIGTERM to the trainers and waits for them.
A signal can come at any moment, also while this launcher imports its libraries (seconds) or before the
trainers have started: it is caught from the first line of `main`, kept, and passed to each trainer as
soon as the trainer takes it (holds or handles it: launch/train.py does so from its first line; a
trainer that has just started and does not yet would die of it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

REQUEUE = 75  # ssl_ebm.runtime.Preemption.EXIT_CODE (not imported: the launcher needs no ssl_ebm)
FORWARDED = (signal.SIGTERM, signal.SIGUSR1)


def child_pids(parent: int) -> list[int]:
    """Direct children of `parent`, from /proc (the trainers, under accelerate's launcher)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # fields after "(comm)": state, ppid, ...
        if ppid == parent:
            pids.append(int(entry))
    return pids


def takes(pid: int, signum: int) -> bool:
    """Whether process `pid` blocks or catches `signum` (/proc/<pid>/status), so that it would not die of it."""
    try:
        with open(f"/proc/{pid}/status") as f:
            masks = [int(line.split()[1], 16) for line in f if line.startswith(("SigBlk:", "SigCgt:"))]
    except (OSError, ValueError, IndexError):  # gone meanwhile
        return False
    return any(mask >> (signum - 1) & 1 for mask in masks)


class Forwarder:
    """Keeps the stop signals the launcher receives and passes each to every trainer once the trainer takes
    it; a thread checks every 0.1 s, so trainers started after the signal get it too."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.sent: set[tuple[int, int]] = set()  # (pid, signal)

    def handle(self, signum, frame) -> None:
        if signum not in self.received:
            self.received.append(signum)

    def run(self) -> None:
        while True:
            for signum in list(self.received):
                for pid in child_pids(os.getpid()):
                    if (pid, signum) not in self.sent and takes(pid, signum):
                        try:
                            os.kill(pid, signum)
                        except ProcessLookupError:
                            pass
                        self.sent.add((pid, signum))
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    forwarder = Forwarder()  # first: a signal during the imports below must not end the launcher
    for sig in FORWARDED:
        signal.signal(sig, forwarder.handle)
    threading.Thread(target=forwarder.run, daemon=True).start()
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # torch elastic's agent would take SIGTERM over (kill the trainers after 30 s); keep it for us.
    os.environ.setdefault("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGINT,SIGHUP,SIGQUIT")
    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except ChildFailedError as e:  # several processes (torch elastic): requeue if a trainer asked for it
        codes = sorted({failure.exitcode for failure in e.failures.values()})
        print(f"trainers exited with status {codes}", file=sys.stderr, flush=True)
        return REQUEUE if REQUEUE in codes else 1
    except subprocess.CalledProcessError as e:  # one process
        return e.returncode
    except SignalException as e:  # a torch that ignores TORCHELASTIC_SIGNALS_TO_HANDLE: the trainers were told to stop
        print(f"launcher stopped by {e.sigval.name}; the trainers checkpoint on it", file=sys.stderr, flush=True)
        return REQUEUE if e.sigval in FORWARDED else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
