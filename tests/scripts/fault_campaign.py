"""The kill -9 fault campaign: kill training at random moments, resume, and check that every resumed run
ends bit-identical to an uninterrupted one.

    python tests/scripts/fault_campaign.py --kills 24 --seed 0

Each trial picks a storage (file://, or s3:// on a local moto server), a process count (1, or 2 through
`accelerate launch`) and a kill point: inside a step, inside a checkpoint save (after a random number of
store operations), or inside the watchdog's recovery (a run with a divergence injected, killed during the
roll-back's checks, deletes and loads). The run is started through tests/scripts/train_with_kill.py, whose
chosen process sends itself SIGKILL; the whole process group must then be gone (the launcher tears the other
rank down; a process still alive is reported and killed). The same command without the kill resumes
(train.resume=auto); the final checkpoint's model.pt and every rank's chain bank must equal, bit for bit,
those of an uninterrupted run of the same settings (one reference per setting, run once per campaign).
One line per trial: storage, processes, kill point, resumed from, identical. Exit status 1 if any trial
failed. The tiny digits config of the tests keeps a trial to seconds; see docs/HEALTH.md, "Fault campaign".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KILL_SCRIPT = REPO / "tests" / "scripts" / "train_with_kill.py"
STEPS, EVERY = 30, 5
TINY = [  # tests/conftest.py TINY
    "model.z_dim=8", "model.hidden=64", "model.prior_hidden=64",
    "sampler.steps=5", "sampler.bank_size=500",
    "data.batch_unlabelled=64", "data.batch_labelled=16",
    "train.log_every=5", "train.eval_every=10", "train.progress=false",
]
FAULT = ("15:1e4", "optim.lr_prior=1e-5")  # the watchdog test's divergence: caught at step 16, back to step 10
STORAGES, PROCESSES, POINTS = ("file", "s3"), (1, 2), ("step", "save", "restore")


@dataclass
class Trial:
    storage: str
    nproc: int
    point: str
    kill: str  # train_with_kill.py's KILL argument

    @property
    def setting(self) -> tuple[str, int, bool]:
        return self.storage, self.nproc, self.point == "restore"


def plan(kills: int, seed: int) -> list[Trial]:
    """`kills` trials: every (storage, processes, point) combination in turn, in a seeded order, with a seeded
    random moment for each."""
    rng = random.Random(seed)
    combos = [(s, n, p) for s in STORAGES for n in PROCESSES for p in POINTS]
    rng.shuffle(combos)
    return [Trial(*combos[i % len(combos)], kill_spec(rng, *combos[i % len(combos)])) for i in range(kills)]


def kill_spec(rng: random.Random, storage: str, nproc: int, point: str) -> str:
    rank = rng.randrange(nproc)
    if point == "step":
        return f"step:{rng.randint(2, STEPS - 1)}:{rank}:{rng.randint(0, 1)}"
    if point == "save":  # rank 0 writes 5 files, each after unmarking, then COMPLETE: 10 ops before it
        return f"save:{rng.randrange(EVERY, STEPS + 1, EVERY)}:{rank}:{rng.randint(1, 10 if rank == 0 else 2)}"
    # the recovery at step 16: two restore points checked, then (rank 0) one delete, then four files loaded
    return f"restore:16:{rank}:{rng.randint(0, 7 if rank == 0 else 6)}"


# ----------------------------------------------------------------------------- running one training process group


def command(trial_setting: tuple[str, int, bool], kill: str, shards: str, out: Path, ckpt: str,
            port: int) -> list[str]:
    storage, nproc, fault = trial_setting
    args = ["--config", str(REPO / "configs" / "digits.yaml"), *TINY, f"data.shards={shards}",
            f"train.out_dir={out}", f"train.checkpoint_dir={ckpt}", f"train.steps={STEPS}",
            f"train.checkpoint_every={EVERY}", *([FAULT[1]] if fault else [])]
    script = [str(KILL_SCRIPT), kill, FAULT[0] if fault else "none", *args]
    if nproc == 1:
        return [sys.executable, *script]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", str(nproc),
            "--main_process_port", str(port), *script]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_members(pgid: int) -> list[int]:
    """Live processes (zombies excepted) in process group `pgid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def run_group(cmd: list[str], env: dict, timeout: float) -> tuple[int, str, list[int]]:
    """Run `cmd` in its own process group; returns its exit status, its output, and the processes of the group
    still alive after it exited (killed then)."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        time.sleep(0.5)  # let the group's last processes finish exiting
        stray = group_members(proc.pid)
        if stray or rc is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.seek(0)
        return (-999 if rc is None else rc), log.read(), stray


# ----------------------------------------------------------------------------- comparing final checkpoints


def final_state(ckpt: str, nproc: int) -> dict:
    """model.pt and each rank's chain bank of the final checkpoint under `ckpt` (None if it is not complete)."""
    from ssl_ebm.checkpoint import MARKER, CheckpointStore
    from ssl_ebm.state import rank_file

    store, name = CheckpointStore(ckpt), f"step-{STEPS:06d}"
    store.fs.invalidate_cache()
    if not store.exists(name, MARKER):
        return {}
    out = {"model": store.read_torch(name, "model.pt")}
    for rank in range(nproc):
        out[f"bank{rank}"] = store.read_torch(name, rank_file(rank))["bank"]
    return out


def identical(a: dict, b: dict) -> bool:
    import torch

    if not a or a.keys() != b.keys():
        return False
    for part in a:
        x, y = a[part], b[part]
        if x.keys() != y.keys():
            return False
        for k in x:
            same = torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k]
            if not same:
                return False
    return True


# ----------------------------------------------------------------------------- the campaign


class Campaign:
    """Runs trials in `root`; references are computed once per setting."""

    def __init__(self, root: Path, shards: str, s3_url: str | None, log=print):
        self.root, self.shards, self.s3_url, self.log = root, shards, s3_url, log
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
                    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.references: dict = {}
        self.n = 0

    def location(self, storage: str, name: str) -> str:
        return f"{self.s3_url}/{name}" if storage == "s3" else f"file://{self.root / name / 'checkpoints'}"

    def launch(self, setting, kill: str, name: str) -> tuple[int, str, list[int]]:
        cmd = command(setting, kill, self.shards, self.root / name, self.location(setting[0], name), free_port())
        return run_group(cmd, self.env, timeout=600)

    def reference(self, setting) -> dict:
        if setting not in self.references:
            name = "ref-{}-{}-{}".format(setting[0], setting[1], "fault" if setting[2] else "plain")
            rc, out, stray = self.launch(setting, "none", name)
            if rc != 0 or stray:
                self.log(f"reference run {name} failed (exit {rc}, stray {stray}):\n{out[-3000:]}")
            self.references[setting] = final_state(self.location(setting[0], name), setting[1])
        return self.references[setting]

    def trial(self, t: Trial) -> dict:
        """Kill, check the group is gone, resume, compare; one result row."""
        self.n += 1
        ref, name = self.reference(t.setting), f"trial-{self.n:03d}"
        rc, out, stray = self.launch(t.setting, t.kill, name)
        killed = rc != 0 and not final_state(self.location(t.storage, name), t.nproc)
        rc2, out2, stray2 = self.launch(t.setting, "none", name)
        m = re.search(r"resumed from \S+/(\S+) at step", out2)
        row = {"trial": self.n, "storage": t.storage, "processes": t.nproc, "kill": t.kill,
               "killed_exit": rc, "killed": killed, "stray": stray + stray2, "resume_exit": rc2,
               "resumed_from": m.group(1) if m else "start"}
        row["identical"] = rc2 == 0 and identical(ref, final_state(self.location(t.storage, name), t.nproc))
        row["ok"] = row["identical"] and killed and not row["stray"]
        if not row["ok"]:
            row["output"] = (out[-2500:], out2[-2500:])
        return row


def line(row: dict) -> str:
    extra = "" if row["ok"] else (f"  FAILED (killed={row['killed']} exit={row['killed_exit']}/{row['resume_exit']} "
                                  f"stray={row['stray']})")
    return (f"{row['trial']:3d}  {row['storage']:4s}  {row['processes']} proc  {row['kill']:18s}  resumed from "
            f"{row['resumed_from']:12s}  identical {'yes' if row['identical'] else 'no'}{extra}")


def start_s3():
    """A moto S3 server in this process, and the fsspec settings (here and, through FSSPEC_S3, in the training
    processes) that point s3:// at it; returns (server, bucket URL)."""
    import logging

    import fsspec.config
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    conf = {"key": "test", "secret": "test",
            "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "eu-west-1"}}
    os.environ["FSSPEC_S3"] = json.dumps(conf)
    fsspec.config.conf["s3"] = conf
    s3fs.S3FileSystem.clear_instance_cache()
    fsspec.filesystem("s3").mkdir("campaign")
    return server, "s3://campaign"


def run_campaign(trials: list[Trial], root: Path, shards: str, log=print) -> list[dict]:
    server, s3_url = start_s3() if any(t.storage == "s3" for t in trials) else (None, None)
    try:
        campaign = Campaign(root, shards, s3_url, log)
        rows = []
        for t in trials:
            rows.append(campaign.trial(t))
            log(line(rows[-1]))
            if not rows[-1]["ok"]:
                log("\n--- killed run ---\n" + rows[-1]["output"][0] + "\n--- resumed run ---\n" + rows[-1]["output"][1])
        return rows
    finally:
        if server is not None:
            server.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=24, help="number of trials (each kills one run)")
    p.add_argument("--seed", type=int, default=0, help="seed of the trials' order and kill moments")
    p.add_argument("--dir", default=None, help="working directory (default: a temporary one, deleted)")
    args = p.parse_args(argv)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="fault_campaign_") as tmp:
        root = Path(args.dir or tmp)
        from shards.make import build

        shards = str(root / "shards")
        if not Path(shards, "manifest.json").exists():
            build("digits", shards, num_labelled=100, seed=0, progress=False)
        rows = run_campaign(plan(args.kills, args.seed), root, shards)
    ok = sum(r["ok"] for r in rows)
    print(f"{ok} of {len(rows)} trials resumed bit-identical, {sum(r['killed'] for r in rows)} killed mid-run, "
          f"{sum(bool(r['stray']) for r in rows)} with a stray process; {time.time() - t0:.0f} s")
    return 0 if ok == len(rows) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
