"""GPU acceptance in one command: step and end-to-end speed, CIFAR-10 accuracy per minute; one JSON of figures.

    launch/gpu_check.sh --source cifar-10-python.tar.gz          # one GPU: about 7 minutes with the defaults
    python launch/gpu_check.py [--wheels ../shared/wheels] (--source PATH | --shards URL) [--train-minutes 2]
    python launch/gpu_check.py --cpu-smoke --source TINY_CIFAR --out smoke.json      # the same plumbing on CPU

Setup: the CIFAR-10 shards of configs/cifar10.yaml (4,000 labels, split seed 0) are built once from --source
(the cifar-10-python archive or its folder, or the cifar10_jpeg folder of ../shared/data, taken when no
source is given and the archive is absent), unless --shards names built ones. Every part uses them.
Then the parts (--parts, default bench,cifar), each a subprocess run as a user would run it:
1. bench: `python -m ssl_ebm.bench --config configs/cifar10.yaml --steps 200 --repeats 3 --warmup 20
   --no-eager` (WRN-28-2, 448 + 64 images, bf16): the captured step's median and spread over the repeats,
   end to end through the training input pipeline against the step alone (`end_to_end_over_step`), and
   the profiler's per-part breakdown of one step (docs/PERFORMANCE.md).
2. cifar: `launch/train.py --config configs/cifar10.yaml` for ours, then for the supervised-only twin
   (train.method=supervised), each stopped --train-minutes after its first step by the stop signal
   (SIGUSR1, as at a SLURM time limit: it checkpoints and exits with status 75). The same command with
   train.steps set to the update reached then resumes that checkpoint and runs only the teardown, the
   test split on the device. Figures: updates, updates/s, samples/s, test accuracy, and the hours the
   config's 400,000 updates would take at ours' steady speed.
3. short (on request): 1,000 bf16 updates, then validation and test: steps/s, samples/s, accuracy.
4. zero2 (on request): `accelerate launch --config_file configs/accelerate/zero2.yaml --num_processes 1`
   with a WRN-28-10 encoder for 200 bf16 updates: steps/s, samples/s, whether it finished.
Peak GPU memory of the training parts is polled with nvidia-smi (device-wide, MiB); the bench reports its own.

The JSON (default results/gpu/<gpu>_<date>.json) is rewritten after every part and every CIFAR-10 arm, so
a part that fails or runs out of time leaves the others' figures; a failed part records its exit status
and the last lines of its output, and the command exits 1. --cpu-smoke runs the parts tiny on CPU (a small
conv net on image shards, tiny MLPs of configs/digits.yaml on the digits shards; seconds of training per
arm): the same code paths, no speed claim.

The GPU machine has no network and lacks deepspeed / webdataset / datasets: --wheels DIR installs the
wheels there into --site (pip --no-index --no-deps --target) and puts that on the subprocesses' PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssl_ebm import config as C  # noqa: E402  (yaml only: the parts import torch, this process need not)
from ssl_ebm.shard_format import locate, url_to_fs  # noqa: E402  (fsspec only)

PARTS = ("bench", "cifar", "short", "zero2")
CIFAR_CONFIG = "configs/cifar10.yaml"
JPEG_SOURCE = REPO.parent / "shared" / "data" / "cifar10_jpeg"  # ../shared/data beside the checkout

# Per part: arguments and overrides (GPU setting; cpu-smoke setting below). Part timeouts in seconds; a CIFAR-10
# arm may take its time box plus "cifar_arm" (start-up, the stop, the test split).
QUIET = ["train.eval_every=0", "train.checkpoint_every=0", "train.image_every=0", "train.progress=false"]
GPU = {
    "build": ["--num-labelled", "4000", "--seed", "0"],
    "bench": ["--steps", "200", "--repeats", "3", "--warmup", "20", "--profile-steps", "10", "--no-eager"],
    "tiny": [],
    "cifar": [*QUIET, "train.log_every=100", "train.mixed_precision=bf16"],
    "short": [*QUIET, "train.steps=1000", "train.log_every=100", "train.mixed_precision=bf16"],
    "zero2": [*QUIET, "model.wrn_width=10", "train.steps=200", "train.log_every=20", "train.mixed_precision=bf16",
              "health.watchdog=false"],
    "train_minutes": 2.0,
    "timeouts": {"bench": 300, "cifar_arm": 180, "short": 150, "zero2": 120},
}
TINY_DIGITS = ["model.z_dim=8", "model.hidden=32", "model.prior_hidden=32", "sampler.steps=3", "sampler.bank_size=200",
               "data.batch_unlabelled=32", "data.batch_labelled=8", "train.cpu_threads=1"]
TINY_IMAGES = ["model.encoder=conv", "model.conv_channels=8", "model.gen_channels=8", "model.z_dim=8",
               "model.prior_hidden=32", "sampler.steps=3", "sampler.bank_size=200", "data.batch_unlabelled=16",
               "data.batch_labelled=8", "data.workers=1", "data.eval_batch=100", "train.cpu_threads=1"]
CPU_SMOKE = {
    "build": ["--num-labelled", "20", "--num-val", "20", "--shard-size", "100", "--seed", "0"],
    "bench": ["--steps", "2", "--repeats", "3", "--warmup", "1", "--profile-steps", "2"],
    "tiny": TINY_IMAGES,  # TINY_DIGITS and configs/digits.yaml on vector shards (main)
    "cifar": [*QUIET, "train.steps=1000000", "train.log_every=2", "train.mixed_precision=bf16"],
    "short": [*QUIET, "train.steps=6", "train.log_every=2", "train.mixed_precision=bf16"],
    "zero2": [*QUIET, "model.encoder=mlp", "train.steps=4", "train.log_every=2", "health.watchdog=false"],
    "train_minutes": 0.1,
    "timeouts": {"bench": 180, "cifar_arm": 150, "short": 120, "zero2": 240},
}


class CheckError(ValueError):
    """An argument or input the check cannot use; the message says what to change."""


class MemoryPoller:
    """Peak device-wide GPU memory (MiB) seen by nvidia-smi while a part runs; None without nvidia-smi."""

    def __init__(self, every_s: float = 0.5) -> None:
        self.every_s, self.peak, self._stop = every_s, None, threading.Event()
        self._exe = shutil.which("nvidia-smi")

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run([self._exe, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                used = max(float(x) for x in out.split())
                self.peak = used if self.peak is None else max(self.peak, used)
            except (subprocess.SubprocessError, ValueError, OSError):
                pass
            self._stop.wait(self.every_s)

    def __enter__(self) -> MemoryPoller:
        if self._exe:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._exe:
            self._thread.join(timeout=15)


def install_wheels(wheels: Path, site: Path) -> None:
    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise CheckError(f"no .whl files in {wheels}; pass --wheels the folder that holds them")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                    *map(str, found)], check=True)


def run_part(name: str, cmd: list[str], env: dict, timeout: float, result: dict, stop_after=None,
             ok_status: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess | None:
    """Run one part; record its wall time, and on failure its status and the tail of its output.
    `stop_after()`, polled while it runs, returns True once the part is to get the stop signal (SIGUSR1)."""
    t0 = time.time()
    with MemoryPoller() as mem, tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        # Its own process group, so that a timeout ends the launcher's trainers (and their compilers) too.
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
        signalled = None
        while proc.poll() is None:
            if time.time() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            if stop_after is not None and signalled is None and stop_after():
                os.kill(proc.pid, signal.SIGUSR1)
                signalled = time.time()
            time.sleep(0.2)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    record = {"ok": proc.returncode in ok_status, "wall_s": round(time.time() - t0, 1), "command": " ".join(cmd)}
    if signalled is not None:
        record["stop_signal_at_s"] = round(signalled - t0, 1)
    if mem.peak is not None:
        record["peak_gpu_memory_mib"] = mem.peak
    if proc.returncode not in ok_status:
        why = f"timed out after {timeout:.0f} s" if time.time() - t0 > timeout else f"exit status {proc.returncode}"
        record.update(error=why, output_tail=(stdout + stderr)[-2000:])
    result[name] = record
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr) if record["ok"] else None


def log_records(out_dir: Path) -> list[dict]:
    """The complete lines of a run's log.jsonl so far (a line being written is left for later)."""
    path = out_dir / "log.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def train_figures(out_dir: Path, batch: int) -> dict:
    """steps/s and samples/s from log.jsonl (the first logging window, which holds start-up, left out)."""
    train = [r for r in log_records(out_dir) if "steps_per_s" in r]
    steady = train[1:] or train
    steps_per_s = sum(r["steps_per_s"] for r in steady) / len(steady) if steady else None
    figures = {"logged_steps": [r["step"] for r in train], "final_loss": train[-1]["loss"] if train else None,
               "steps_per_s": steps_per_s, "samples_per_s": steps_per_s * batch if steps_per_s else None}
    metrics_path = out_dir / "metrics.json"
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        figures.update(test_accuracy=metrics.get("test", {}).get("accuracy"), val_accuracy=metrics.get("val_accuracy"),
                       nan_skips=metrics.get("nan_skips"), seconds=metrics.get("seconds"),
                       processes=metrics.get("processes"))
    return figures


def load_config(config: str, overrides: list[str]) -> C.Config:
    return C.load_config(str(REPO / config), overrides)


def batch_size(overrides: list[str], config: str) -> int:
    """Examples per update: the supervised baseline reads the labelled batch only."""
    cfg = load_config(config, overrides)
    return cfg.data.batch_labelled + (cfg.data.batch_unlabelled if cfg.train.method == "ebm" else 0)


# ----------------------------------------------------------------------------- the shards


def cifar_source(source: str | None) -> tuple[str, Path]:
    """(dataset, source path): --source, else the config's archive, else ../shared/data/cifar10_jpeg."""
    if source is None:
        default = REPO / load_config(CIFAR_CONFIG, []).data.source
        path = default if default.exists() else JPEG_SOURCE
    else:
        path = Path(source).resolve()
    if not path.exists():
        raise CheckError(f"no CIFAR-10 source at {path}: pass --source (cifar-10-python.tar.gz or its folder, "
                         "or the cifar10_jpeg folder) or --shards URL of built shards")
    jpeg = path.name == "cifar10_jpeg_q75.npz" or (path / "cifar10_jpeg_q75.npz").exists()
    return ("cifar10_jpeg" if jpeg else "cifar10"), path


def read_manifest(url: str) -> dict:
    """The shards' manifest.json (the parts check the shards themselves as they read them)."""
    fs, path = url_to_fs(locate(url)[1])
    try:
        with fs.open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckError(f"no readable shards at {url} ({type(e).__name__}: {e}); pass --shards the URL of a "
                         "directory built by `python -m shards.make`, or --source to build them") from None


def ensure_shards(source: str | None, build_args: list[str], root: Path, env: dict, result: dict) -> str | None:
    """The CIFAR-10 shards under `root` (<dataset>_<labels>_npy), built first if missing; None if the build failed."""
    dataset, path = cifar_source(source)
    url = root / f"{dataset}_{build_args[build_args.index('--num-labelled') + 1]}_npy"
    if not (url / "manifest.json").exists():
        cmd = [sys.executable, "-m", "shards.make", "--dataset", dataset, "--source", str(path), "--out", str(url),
               *build_args, "--no-progress"]
        if run_part("shards", cmd, env, 900, result) is None:
            return None
    return str(url)


# ----------------------------------------------------------------------------- CIFAR-10 accuracy per minute


def time_boxed_arm(method: str, config: str, overrides: list[str], budget_s: float, env: dict, timeout: float,
                   work: Path) -> dict:
    """One arm: train until `budget_s` after its first step, stop it by signal, test the checkpoint it wrote."""
    out = work / f"cifar_{method}"
    overrides = [*overrides, f"train.method={method}", f"train.out_dir={out}"]
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / config), *overrides]
    clock = {}

    def due() -> bool:  # the first logged window says when training began: log_every steps ago, at its speed
        if "began" not in clock:
            first = next((r for r in log_records(out) if "steps_per_s" in r), None)
            if first is None:
                return False
            clock["began"] = time.time() - first["step"] / first["steps_per_s"]
        if time.time() < clock["began"] + budget_s:
            return False
        clock["stopped"] = time.time()
        return True

    record: dict = {}
    proc = run_part("train", cmd, env, budget_s + timeout, record, stop_after=due, ok_status=(0, 75))
    arm = record["train"]
    if proc is None:
        return arm
    if proc.returncode == 75:  # stopped at a checkpoint: the same command with train.steps = the step it reached
        done = [int(d.name.split("-")[1]) for d in (out / "checkpoints").glob("step-*") if (d / "COMPLETE").exists()]
        if not done:
            return {**arm, "ok": False, "error": f"stopped without a complete checkpoint in {out / 'checkpoints'}"}
        if run_part("test", [*cmd, f"train.steps={max(done)}"], env, timeout, record) is None:  # only the teardown
            return {**arm, "ok": False, "error": f"testing the checkpoint: {record['test']['error']}",
                    "output_tail": record["test"]["output_tail"]}
        arm["test_wall_s"] = record["test"]["wall_s"]
    metrics = json.loads((out / "metrics.json").read_text())
    figures = train_figures(out, batch_size(overrides, config))
    # From its first step to the signal; a run that ended by itself inside the box: its whole time.
    train_s = round(clock["stopped"] - clock["began"] if "stopped" in clock else metrics["seconds"], 3)
    arm.update(budget_s=budget_s, updates=metrics["steps"], train_s=train_s,
               updates_per_s=metrics["steps"] / train_s, updates_per_s_steady=figures["steps_per_s"],
               samples_per_s_steady=figures["samples_per_s"], test_accuracy=metrics["test"]["accuracy"],
               test_macro_f1=metrics["test"].get("macro_f1"), nan_skips=metrics["nan_skips"],
               recoveries=metrics.get("recoveries"))
    return arm


def cifar_part(plan: dict, config: str, overrides: list[str], minutes: float, env: dict, work: Path, result: dict,
               write) -> None:
    part = result["cifar"] = {"ok": False, "train_minutes": minutes}
    for name, method in (("ours", "ebm"), ("supervised", "supervised")):
        part[name] = time_boxed_arm(method, config, overrides, 60 * minutes, env, plan["timeouts"]["cifar_arm"], work)
        write()
        if not part[name]["ok"]:
            return
    steps = load_config(config, []).train.steps  # the config's own schedule
    part["paper_schedule"] = {
        "updates": steps, "hours_at_ours_steady_speed": steps / part["ours"]["updates_per_s_steady"] / 3600,
        "command": f"accelerate launch launch/train.py --config {CIFAR_CONFIG} data.source=cifar-10-python.tar.gz"}
    part["ok"] = True


# ----------------------------------------------------------------------------- the command


def default_out(machine: dict, smoke: bool) -> str:
    if smoke:
        return "gpu_check_smoke.json"
    found = re.search(r"\b([A-Z]\d{2,4})\b", machine.get("device", ""))
    return f"results/gpu/{found.group(1).lower() if found else 'gpu'}_{time.strftime('%Y-%m-%d')}.json"


def main(argv=None) -> int:
    try:
        return check(argv)
    except CheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="where the JSON of figures goes (default results/gpu/<gpu>_<date>.json)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny settings on CPU: checks the plumbing, not speed")
    p.add_argument("--wheels", help="folder of wheels to install first (the offline GPU machine: ../shared/wheels)")
    p.add_argument("--site", default=os.path.join(tempfile.gettempdir(), "ssl_ebm_site"),
                   help="where --wheels are installed")
    p.add_argument("--shards", help="shard directory URL for every part (default: built from --source)")
    p.add_argument("--source", help="CIFAR-10 source to build the shards from (default: the config's archive, "
                                    "else ../shared/data/cifar10_jpeg)")
    p.add_argument("--train-minutes", type=float, help="training time of each CIFAR-10 arm (GPU default 2)")
    p.add_argument("--work", help="folder for the runs' output (default: a temporary one)")
    p.add_argument("--parts", default="bench,cifar", help=f"comma-separated subset of {','.join(PARTS)}")
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        raise CheckError(f"--parts: unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")
    if args.train_minutes is None:
        args.train_minutes = (CPU_SMOKE if args.cpu_smoke else GPU)["train_minutes"]
    if args.train_minutes <= 0:
        raise CheckError(f"--train-minutes is {args.train_minutes}; give each CIFAR-10 arm a time above 0")
    return args


def environment(args: argparse.Namespace) -> dict:
    """The parts' environment: this repository (and the installed --wheels) first on PYTHONPATH."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.cpu_smoke:
        env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    paths = [str(REPO)]
    if args.wheels:
        install_wheels(Path(args.wheels), Path(args.site))
        paths.append(args.site)
    env["PYTHONPATH"] = os.pathsep.join(paths + [x for x in [os.environ.get("PYTHONPATH")] if x])
    return env


def machine_info(env: dict) -> dict:
    info = subprocess.run([sys.executable, "-c", "import json, torch; print(json.dumps({'torch': torch.__version__, "
                           "'cuda': torch.cuda.is_available(), 'device': torch.cuda.get_device_name(0) "
                           "if torch.cuda.is_available() else 'cpu'}))"], env=env, capture_output=True, text=True)
    return json.loads(info.stdout) if info.returncode == 0 else {"error": info.stderr[-500:]}


def run_parts(args, plan: dict, config: str, data: list[str], env: dict, work: Path, result: dict, write) -> None:
    """The parts asked for, in the module docstring's order; the JSON is written after each."""
    if "bench" in args.parts:
        cmd = [sys.executable, "-m", "ssl_ebm.bench", "--config", str(REPO / config), *plan["bench"], *data]
        proc = run_part("bench", cmd, env, plan["timeouts"]["bench"], result)
        if proc is not None:
            result["bench"].update(json.loads(proc.stdout))
        write()
    if "cifar" in args.parts:
        cifar_part(plan, config, [*data, *plan["cifar"]], args.train_minutes, env, work, result, write)
        write()
    if "short" in args.parts:
        out = work / "short"
        overrides = [*data, *plan["short"], f"train.out_dir={out}"]
        cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / config), *overrides]
        if run_part("short", cmd, env, plan["timeouts"]["short"], result) is not None:
            result["short"].update(train_figures(out, batch_size(overrides, config)))
        write()
    if "zero2" in args.parts:
        out = work / "zero2"
        overrides = [*data, *plan["zero2"], f"train.out_dir={out}"]
        launcher = ["--config_file", str(REPO / "configs" / "accelerate" / "zero2.yaml"), "--num_processes", "1",
                    "--main_process_port", "29533"]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, str(REPO / "launch" / "train.py"),
               "--config", str(REPO / config), *overrides]
        if run_part("zero2", cmd, env, plan["timeouts"]["zero2"], result) is not None:
            result["zero2"].update(train_figures(out, batch_size(overrides, config)))
        write()


def check(argv=None) -> int:
    args = parse_args(argv)
    plan = CPU_SMOKE if args.cpu_smoke else GPU
    env = environment(args)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_info(env)
    out_path = Path(args.out or default_out(machine, args.cpu_smoke))
    result: dict = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu", "parts": args.parts,
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"), "work_dir": str(work), "machine": machine}

    def write() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n")

    write()
    # Built once: on GPU under data_cache/ (kept between calls of a warm machine, for a rerun), for the smoke in work.
    root = work if args.cpu_smoke else REPO / "data_cache"
    url = args.shards or ensure_shards(args.source, plan["build"], root, env, result)
    if url is None:  # the build failed: its record says why
        result["ok"] = False
        write()
        return 1
    manifest = read_manifest(url)
    images = manifest["kind"] == "image"
    config = CIFAR_CONFIG if images else "configs/digits.yaml"  # digits: the smoke's vector shards
    tiny = plan["tiny"] if images or not args.cpu_smoke else TINY_DIGITS
    result["config"] = config
    result["shards"] = {**result.get("shards", {}), "url": url, "dataset": manifest["dataset"],  # with the build's
                        "labelled": manifest["splits"]["labelled"]["count"]}  # record, when this run built them
    write()
    run_parts(args, plan, config, [*tiny, f"data.shards={url}"], env, work, result, write)
    result["ok"] = all(result[part]["ok"] for part in args.parts)
    write()
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
