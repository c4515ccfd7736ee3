"""The kill -9 fault campaign: kill training at random moments, resume, and check that every resumed run
ends bit-identical to an uninterrupted one.

    python tests/scripts/fault_campaign.py --kills 56 --seed 0 [--settings ddp1,zero2,...] [--dir DIR]

A trial runs one setting (below) on a storage (file://, or s3:// on a local moto server), kills it once with
SIGKILL at a seeded random moment, then runs the same command without the kill (train.resume=auto; for the
elastic settings, on 1 process), and compares the end of that run with the end of an uninterrupted run of
the same setting, bit for bit: the final checkpoint's weights (model.pt), optimizer and schedule
(optimizer.pt; under ZeRO every engine file), weight average (ema.pt), every rank's chains and RNG states
(rank-*.pt), counters (meta.json, the run id aside), and metrics.json (which checkpoint was tested, its
validation and test figures, the ranks' weight checksums; the wall time aside). With 2 processes the killed
process's launcher must tear the other down: any process the launch started (ranks, loader workers) still
alive 10 s after the launcher exited fails the trial.

Settings (the tiny digits config of the tests, 30 updates, a checkpoint every 5, 2 kept):
    ddp1, ddp2         1 / 2 processes (gloo DDP)
    workers1           data.workers=1 (a loader worker process)
    accum2             train.grad_accum=2, 2 processes
    ema                train.ema_decay=0.9
    zero2              DeepSpeed ZeRO-2 on the CPU, 2 processes
    elastic            2 processes, resumed on 1
    elastic_accum      2 processes at train.grad_accum=1, resumed on 1 at train.grad_accum=2

Kill moments (tests/scripts/train_with_kill.py), each setting's in turn: `timer` (drawn twice as often as the
others: a timer started at the first step fires after a random delay, up to the time the uninterrupted run
took from its first step to its end, wherever the run is then: in a step, a save, a pruning, an evaluation,
the teardown), `step` (at a step's start, or after its backward), `save` (after
1-10 store operations of a checkpoint save), `upload` (a file write cut halfway: half of a checkpoint file or
engine shard reaches the store), `prune` (inside the pruning of old checkpoints, a directory's removal cut
halfway), `restore` (inside the watchdog's roll-back, in a run with a divergence injected at update 15).

The reference of an elastic trial depends on where the resumed run started: 2 processes to that checkpoint
(killed cleanly at the start of the next step), then 1 process to the end; it is run once per checkpoint.
One line per trial; a summary per setting; exit status 1 if any trial failed. See docs/HEALTH.md,
"Fault campaign". A timer's moment is seeded as a fraction of the uninterrupted run's training time, so the same
seed kills at about, not exactly, the same instruction.
"""

from __future__ import annotations

import argparse
import contextlib
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
import uuid
from dataclasses import dataclass, field
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
WHERE = ("out_dir", "checkpoint_dir")  # train.* keys that differ between a trial and its reference
FAULT = ("15:1e4", "optim.lr_prior=1e-5")  # the watchdog test's divergence: caught at step 16, back to step 10


@dataclass(frozen=True)
class Setting:
    name: str
    nproc: int  # processes of the run that is killed
    points: tuple[str, ...]  # kill moments drawn for it
    overrides: tuple[str, ...] = ()
    resume_nproc: int = 0  # processes of the resumed run (0: the same)
    resume_overrides: tuple[str, ...] = ()
    zero: bool = False  # DeepSpeed ZeRO-2 (configs/accelerate/zero2.yaml)

    @property
    def elastic(self) -> bool:
        return bool(self.resume_nproc) and self.resume_nproc != self.nproc


ALL_POINTS = ("timer", "timer", "step", "save", "upload", "prune")  # (timers drawn twice as often)
SETTINGS = {s.name: s for s in [
    Setting("ddp1", 1, ALL_POINTS + ("restore",)),
    Setting("ddp2", 2, ALL_POINTS + ("restore",)),
    Setting("workers1", 1, ALL_POINTS, ("data.workers=1",)),
    Setting("accum2", 2, ALL_POINTS, ("train.grad_accum=2",)),
    Setting("ema", 1, ALL_POINTS, ("train.ema_decay=0.9",)),
    Setting("zero2", 2, ALL_POINTS, zero=True),
    Setting("elastic", 2, ("timer", "timer", "step", "save", "upload"), resume_nproc=1),
    Setting("elastic_accum", 2, ("timer", "timer", "step", "save", "upload"), resume_nproc=1,
            resume_overrides=("train.grad_accum=2",)),
]}


@dataclass
class Trial:
    setting: str
    storage: str
    point: str
    kill: str  # train_with_kill.py's KILL, except `timer:FRACTION:RANK` (of the uninterrupted run's training)


def plan(kills: int, seed: int, settings: list[str] | None = None, storages=("file", "s3")) -> list[Trial]:
    """`kills` trials: the settings in turn (seeded order), each setting's kill moments in turn (seeded order),
    a seeded storage and a seeded random moment for each."""
    rng = random.Random(seed)
    names = list(settings or SETTINGS)
    rng.shuffle(names)
    points = {n: rng.sample(SETTINGS[n].points, len(SETTINGS[n].points)) for n in names}
    trials = []
    for i in range(kills):
        s = SETTINGS[names[i % len(names)]]
        point = points[s.name][(i // len(names)) % len(s.points)]
        trials.append(Trial(s.name, rng.choice(storages), point, kill_spec(rng, s, point)))
    return trials


def kill_spec(rng: random.Random, s: Setting, point: str) -> str:
    rank = rng.randrange(s.nproc)
    if point == "timer":
        return f"timer:{rng.random():.3f}:{rank}"
    if point == "step":
        return f"step:{rng.randint(2, STEPS - 1)}:{rank}:{rng.randint(0, 1)}"
    at = rng.randrange(EVERY, STEPS + 1, EVERY)
    if point == "save":  # rank 0 writes 5-7 files (each after unmarking; under ZeRO engine shards too), COMPLETE
        return f"save:{at}:{rank}:{rng.randint(1, 10 if rank == 0 else 2)}"
    if point == "upload":  # every rank writes its rank file (and engine shards); rank 0 then the rest
        return f"upload:{at}:{rank}:{rng.randint(1, 7 if rank == 0 else 2)}"
    if point == "prune":  # rank 0 prunes; from step 10 on, one old step-* goes at every save
        return f"prune:{rng.randrange(2 * EVERY, STEPS + 1, EVERY)}:0:{rng.randint(0, 2)}"
    # the recovery at step 16: two restore points checked, then (rank 0) one delete, then four files loaded
    return f"restore:16:{rank}:{rng.randint(0, 7 if rank == 0 else 6)}"


# ----------------------------------------------------------------------------- running one training process group


def command(s: Setting, kill: str, fault: bool, resumed: bool, shards: str, out: Path, ckpt: str,
            port: int) -> list[str]:
    nproc = s.resume_nproc if resumed and s.resume_nproc else s.nproc
    args = ["--config", str(REPO / "configs" / "digits.yaml"), *TINY, f"data.shards={shards}",
            f"train.out_dir={out}", f"train.checkpoint_dir={ckpt}", f"train.steps={STEPS}",
            f"train.checkpoint_every={EVERY}", *s.overrides, *(s.resume_overrides if resumed else ()),
            *([FAULT[1]] if fault else [])]
    script = [str(KILL_SCRIPT), kill, FAULT[0] if fault else "none", *args]
    if nproc == 1 and not s.zero:
        return [sys.executable, *script]
    launcher = (["--config_file", str(REPO / "configs" / "accelerate" / "zero2.yaml")] if s.zero else
                ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"])
    return [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", str(nproc),
            "--main_process_port", str(port), *script]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tagged(tag: str) -> list[int]:
    """Live processes (zombies excepted) whose environment holds FAULT_CAMPAIGN_RUN=`tag`: every process one
    launch started (the launcher, its ranks, their loader workers), whatever process group or parent they
    have now (torch's launcher starts each rank in a session of its own)."""
    needle, found = f"FAULT_CAMPAIGN_RUN={tag}".encode(), []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if needle not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(proc.name))
        except OSError:  # gone meanwhile
            continue
    return found


def run_group(cmd: list[str], env: dict, timeout: float) -> tuple[int, str, list[int]]:
    """Run `cmd`; returns its exit status, its output, and the processes it started that were still alive
    10 s after it exited (killed then)."""
    tag = uuid.uuid4().hex
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**env, "FAULT_CAMPAIGN_RUN": tag}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        stray = []
        for _ in range(20):  # let the last processes finish exiting
            stray = tagged(tag)
            if not stray:
                break
            time.sleep(0.5)
        for pid in stray + ([proc.pid] if rc is None else []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        log.seek(0)
        return (-999 if rc is None else rc), log.read(), stray


# ----------------------------------------------------------------------------- what a run ends with


def final_state(ckpt: str, out: Path) -> dict:
    """Everything the end of a run is compared on (empty if its final checkpoint is not complete): every file of
    the final checkpoint, loaded (meta.json without the run id, config.yaml without the run's directories), and
    metrics.json (without the wall time)."""
    import yaml

    from ssl_ebm.checkpoint import MARKER, CheckpointStore

    store, name = CheckpointStore(ckpt), f"step-{STEPS:06d}"
    store.fs.invalidate_cache()
    metrics = out / "metrics.json"
    if not store.exists(name, MARKER) or not metrics.exists():
        return {}
    root = store.root.rstrip("/") + f"/{name}/"
    found = {}
    for path in sorted(store.fs.find(root)):
        rel = path[len(root):] if path.startswith(root) else path.rsplit(f"/{name}/", 1)[-1]
        if rel == MARKER:
            continue
        if rel == "config.yaml":  # where the run wrote aside
            config = yaml.safe_load(store.read_text(name, rel))
            found[rel] = {**config, "train": {k: v for k, v in config["train"].items() if k not in WHERE}}
        elif rel.endswith(".pt"):
            found[rel] = store.read_torch(name, rel)
        elif rel.endswith(".json"):
            found[rel] = {k: v for k, v in store.read_json(name, rel).items() if k != "run_id"}
        else:
            found[rel] = store.read_text(name, rel)
    found["metrics.json"] = {k: v for k, v in json.loads(metrics.read_text()).items() if k != "seconds"}
    return found


def differences(a, b, where: str = "") -> list[str]:
    """Where `a` and `b` differ, bit for bit (tensors: dtype, shape and every bit; objects: their attributes)."""
    import numpy as np
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
        return [] if same else [where]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return [] if np.array_equal(a, b) and np.asarray(a).dtype == np.asarray(b).dtype else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} keys {sorted(map(str, a.keys() ^ b.keys()))}"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b) or type(a) is not type(b):
            return [where]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if type(a) is not type(b):
        return [where]
    if a == b or (isinstance(a, float) and a != a and b != b):  # (NaN == NaN)
        return []
    if hasattr(a, "__dict__") and not isinstance(a, type):  # an object without __eq__ (DeepSpeed's loss scaler)
        return differences(vars(a), vars(b), where)
    return [where]


# ----------------------------------------------------------------------------- the campaign


@dataclass
class Campaign:
    """Runs trials in `root`; each reference is run once."""

    root: Path
    shards: str
    s3_url: str | None
    log: object = print
    references: dict = field(default_factory=dict)
    lifetimes: dict = field(default_factory=dict)  # setting -> (first step, end) of its uninterrupted run, in s
    n: int = 0

    def __post_init__(self):
        self.env = {**os.environ, "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

    def location(self, storage: str, name: str) -> str:
        return f"{self.s3_url}/{name}" if storage == "s3" else f"file://{self.root / name / 'checkpoints'}"

    def launch(self, s: Setting, kill: str, fault: bool, resumed: bool, storage: str, name: str):
        env = self.env if s.zero else {**self.env, "ACCELERATE_USE_CPU": "1"}  # DeepSpeed finds the CPU itself
        cmd = command(s, kill, fault, resumed, self.shards, self.root / name, self.location(storage, name),
                      free_port())
        return run_group(cmd, env, timeout=900)

    def run_to_end(self, s: Setting, fault: bool, name: str, elastic_at: int | None = None) -> dict:
        """An uninterrupted run (for an elastic setting: 2 processes to step-`elastic_at`, killed at the start of
        the next step, then 1 process to the end); its final state. A run to the end times the setting."""
        kill = "none" if elastic_at in (None, STEPS) else f"step:{elastic_at + 1}:0:0"
        rc, out, stray = self.launch(s, kill, fault, False, "file", name)
        lived = [tuple(map(float, m)) for m in re.findall(r"^lifetime ([\d.]+), first step at ([\d.]+)", out, re.M)]
        if lived and not fault:  # (first step, end): the latest rank's
            self.lifetimes.setdefault(s.name, (max(t[1] for t in lived), max(t[0] for t in lived)))
        if elastic_at is not None and (rc != 0) == (elastic_at < STEPS):  # stopped where planned: go on with 1
            rc, out, stray = self.launch(s, "none", fault, True, "file", name)
        if rc != 0 or stray:
            self.log(f"reference run {name} failed (exit {rc}, stray {stray}):\n{out[-3000:]}")
        return final_state(self.location("file", name), self.root / name)

    def reference(self, s: Setting, fault: bool, resumed_at: int | None) -> dict:
        """The uninterrupted run of setting `s`; for an elastic one resumed from step `resumed_at`, the run that
        went over to 1 process there (None: from no checkpoint, 1 process throughout)."""
        if s.elastic and resumed_at is None:  # nothing to resume: the resumed setting from scratch
            s = Setting(s.name + "_fresh", s.resume_nproc, (), s.overrides + s.resume_overrides)
        key = (s.name, fault, resumed_at if s.elastic else None)
        if key not in self.references:
            name = "ref-" + "-".join(str(k) for k in key if k not in (None, False)) + ("-fault" if fault else "")
            self.references[key] = self.run_to_end(s, fault, name, resumed_at if s.elastic else None)
        return self.references[key]

    def lifetime(self, s: Setting) -> tuple[float, float]:
        """Seconds from the start of the setting's uninterrupted run (of its first part, if elastic) to its first
        step and to its end."""
        if s.name not in self.lifetimes:
            self.reference(s, False, STEPS if s.elastic else None)
        return self.lifetimes[s.name]

    def trial(self, t: Trial) -> dict:
        """Kill, check the group is gone, resume, compare; one result row."""
        self.n += 1
        s, name, fault = SETTINGS[t.setting], f"trial-{self.n:03d}", t.point == "restore"
        kill = t.kill
        if t.point == "timer":
            _, fraction, rank = kill.split(":")
            first, end = self.lifetime(s)
            kill = f"timer:{float(fraction) * (end - first):.3f}:{rank}"
        started = time.time()
        rc, out, stray = self.launch(s, kill, fault, False, t.storage, name)
        rc2, out2, stray2 = self.launch(s, "none", fault, True, t.storage, name)
        m = re.search(r"resumed from \S+/step-(\d+) at step", out2)
        resumed_at = int(m.group(1)) if m else None
        got = final_state(self.location(t.storage, name), self.root / name)
        diff = differences(self.reference(s, fault, resumed_at), got) if got else ["no final checkpoint"]
        row = {"trial": self.n, "setting": t.setting, "storage": t.storage,
               "processes": f"{s.nproc}->{s.resume_nproc}" if s.elastic else str(s.nproc), "point": t.point,
               "kill": kill, "killed_exit": rc, "killed": rc != 0, "stray": stray + stray2, "resume_exit": rc2,
               "resumed_from": f"step-{resumed_at:06d}" if m else "start", "identical": rc2 == 0 and not diff,
               "differences": diff[:8], "seconds": round(time.time() - started, 1)}
        row["ok"] = row["identical"] and not row["stray"]
        if not row["ok"]:
            row["output"] = (out[-2500:], out2[-2500:])
        return row


def line(row: dict) -> str:
    extra = "" if row["ok"] else (f"  FAILED (exit {row['killed_exit']}/{row['resume_exit']} stray={row['stray']} "
                                  f"differences: {', '.join(row['differences'])})")
    killed = "" if row["killed"] else "  (the run ended before the kill)"
    return (f"{row['trial']:3d}  {row['setting']:13s}  {row['storage']:4s}  {row['processes']:4s}  "
            f"{row['kill']:20s}  resumed from {row['resumed_from']:11s}  identical "
            f"{'yes' if row['identical'] else 'no'}  {row['seconds']:5.0f} s{killed}{extra}")


def summary(rows: list[dict], seconds: float) -> str:
    lines = []
    for name in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == name]
        points = ", ".join(f"{p} {sum(r['point'] == p for r in mine)}" for p in dict.fromkeys(r["point"] for r in mine))
        lines.append(f"  {name:13s}  {sum(r['killed'] for r in mine):2d} kills, {sum(r['ok'] for r in mine):2d} of "
                     f"{len(mine):2d} identical  ({points})")
    kills = sum(r["killed"] for r in rows)
    ok = sum(r["ok"] for r in rows)
    ok_killed = sum(r["ok"] and r["killed"] for r in rows)
    return "\n".join([f"{kills} kills in {len(rows)} trials over {len(lines)} settings: {ok_killed} of {kills} "
                      f"killed runs resumed bit-identical ({ok} of {len(rows)} trials), "
                      f"{sum(bool(r['stray']) for r in rows)} with a stray process; {seconds:.0f} s", *lines])


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


def s3_available() -> bool:
    try:
        import moto.server  # noqa: F401  (the local S3 server)
        import s3fs  # noqa: F401
    except ImportError:
        return False
    return True


def run_campaign(trials: list[Trial], root: Path, shards: str, log=print) -> list[dict]:
    server, s3_url = start_s3() if any(t.storage == "s3" for t in trials) else (None, None)
    try:
        campaign = Campaign(root, shards, s3_url, log)
        rows = []
        for t in trials:
            rows.append(campaign.trial(t))
            log(line(rows[-1]))
            if not rows[-1]["ok"]:
                killed, resumed = rows[-1]["output"]
                log(f"\n--- killed run ---\n{killed}\n--- resumed run ---\n{resumed}")
        return rows
    finally:
        if server is not None:
            server.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=56, help="number of trials (each kills one run)")
    p.add_argument("--seed", type=int, default=0, help="seed of the trials' order, storages and kill moments")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    p.add_argument("--dir", default=None, help="working directory (default: a temporary one, deleted)")
    args = p.parse_args(argv)
    settings = [n for n in args.settings.split(",") if n]
    unknown = [n for n in settings if n not in SETTINGS]
    if unknown:
        p.error(f"--settings: unknown {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="fault_campaign_") as tmp:
        root = Path(args.dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        from shards.make import build

        shards = str(root / "shards")
        if not Path(shards, "manifest.json").exists():
            build("digits", shards, num_labelled=100, seed=0, progress=False)
        trials = plan(args.kills, args.seed, settings, ("file", "s3") if s3_available() else ("file",))
        print(f"fault campaign: {len(trials)} trials, seed {args.seed}, settings {', '.join(settings)}", flush=True)
        rows = run_campaign(trials, root, shards, log=lambda text: print(text, flush=True))
    print(summary(rows, time.time() - t0))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
