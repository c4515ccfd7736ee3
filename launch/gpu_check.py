"""GPU readiness in one command: the speed benchmark, a short bf16 run, a ZeRO-2 run; one JSON of figures.

    python launch/gpu_check.py [--wheels ../shared/wheels] [--out gpu_check.json]   # one GPU, under 8 minutes
    python launch/gpu_check.py --cpu-smoke --out smoke.json                         # the same plumbing on CPU

Three parts, each a subprocess run exactly as a user would run it, from the repository root:
1. bench: `python -m ssl_ebm.bench --config configs/cifar10_jpeg.yaml` (captured vs eager sampler side by
   side, end to end from the shards; docs/PERFORMANCE.md). Builds the shards on first use.
2. short: `launch/train.py --config configs/cifar10_jpeg.yaml train.mixed_precision=bf16` for a few
   hundred steps, then validation and test: steps/s, samples/s, test accuracy.
3. zero2: `accelerate launch --config_file configs/accelerate/zero2.yaml --num_processes 1 launch/train.py`
   with a WRN-28-10 encoder for 200 steps, bf16: steps/s, samples/s, whether it finished.
Peak GPU memory of parts 2 and 3 is polled with nvidia-smi (device-wide, MiB); the bench reports its own.

The JSON is rewritten after every part, so a part that fails or runs out of time leaves the others'
figures; a failed part records its exit status and the last lines of its output, and the command exits 1.
--cpu-smoke swaps in configs/digits.yaml with tiny sizes and a few steps (same three parts, same code
paths, seconds each); its figures say nothing about GPU speed.

The GPU machine has no network and lacks deepspeed / webdataset / datasets: --wheels DIR installs the
wheels there into --site (pip --no-index --no-deps --target) and puts that on the subprocesses' PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Per part: config, overrides, steps (GPU setting; cpu-smoke setting below).
GPU = {
    "config": "configs/cifar10_jpeg.yaml",
    "bench": ["--steps", "50", "--warmup", "10"],
    "bench_overrides": [],
    "short": ["train.steps=1000", "train.log_every=100", "train.eval_every=0", "train.checkpoint_every=0",
              "train.image_every=0", "train.mixed_precision=bf16"],
    "zero2": ["model.wrn_width=10", "train.steps=200", "train.log_every=20", "train.eval_every=0",
              "train.checkpoint_every=0", "train.image_every=0", "train.mixed_precision=bf16", "health.watchdog=false"],
    "timeouts": {"bench": 180, "short": 150, "zero2": 120},
}
TINY = ["model.z_dim=8", "model.hidden=32", "model.prior_hidden=32", "sampler.steps=3", "sampler.bank_size=200",
        "data.batch_unlabelled=32", "data.batch_labelled=8", "train.cpu_threads=1"]
CPU_SMOKE = {
    "config": "configs/digits.yaml",
    "bench": ["--steps", "2", "--warmup", "1"],
    "bench_overrides": TINY,
    "short": [*TINY, "train.steps=6", "train.log_every=2", "train.eval_every=0", "train.checkpoint_every=0",
              "train.mixed_precision=bf16"],
    "zero2": [*TINY, "model.encoder=mlp", "train.steps=4", "train.log_every=2", "train.eval_every=0",
              "train.checkpoint_every=0", "health.watchdog=false"],
    "timeouts": {"bench": 120, "short": 120, "zero2": 240},
}


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
        raise SystemExit(f"error: no .whl files in {wheels}; pass --wheels the folder that holds them")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                    *map(str, found)], check=True)


def run_part(name: str, cmd: list[str], env: dict, timeout: int, result: dict) -> subprocess.CompletedProcess | None:
    """Run one part; record its wall time, and on failure its status and the tail of its output."""
    t0 = time.time()
    with MemoryPoller() as mem:
        # Its own process group, so that a timeout ends the launcher's trainers (and their compilers) too.
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            result[name] = {"ok": False, "error": f"timed out after {timeout} s", "wall_s": round(time.time() - t0, 1),
                            "command": " ".join(cmd), "output_tail": (stdout + stderr)[-2000:]}
            return None
    proc = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    result[name] = {"ok": proc.returncode == 0, "wall_s": round(time.time() - t0, 1), "command": " ".join(cmd)}
    if mem.peak is not None:
        result[name]["peak_gpu_memory_mib"] = mem.peak
    if proc.returncode != 0:
        result[name].update(error=f"exit status {proc.returncode}", output_tail=(proc.stdout + proc.stderr)[-2000:])
        return None
    return proc


def train_figures(out_dir: Path, batch: int) -> dict:
    """steps/s and samples/s from log.jsonl (the first logging window, which holds start-up, left out)."""
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if "steps_per_s" in r]
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


def batch_size(overrides: list[str], config: str) -> int:
    sys.path.insert(0, str(REPO))
    from ssl_ebm import config as C

    cfg = C.load_config(str(REPO / config), overrides)
    return cfg.data.batch_unlabelled + cfg.data.batch_labelled


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check.json", help="where the JSON of figures goes")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny settings on CPU: checks the plumbing, not speed")
    p.add_argument("--wheels", help="folder of wheels to install first (the offline GPU machine: ../shared/wheels)")
    p.add_argument("--site", default=os.path.join(tempfile.gettempdir(), "ssl_ebm_site"),
                   help="where --wheels are installed")
    p.add_argument("--shards", help="shard directory URL for every part (default: the config's, built on first use)")
    p.add_argument("--work", help="folder for the runs' output (default: a temporary one)")
    p.add_argument("--parts", default="bench,short,zero2", help="comma-separated subset of bench,short,zero2")
    args = p.parse_args(argv)
    plan = CPU_SMOKE if args.cpu_smoke else GPU
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = set(parts) - {"bench", "short", "zero2"}
    if unknown:
        print(f"error: --parts: unknown part(s) {sorted(unknown)}; choose from bench, short, zero2", file=sys.stderr)
        return 2

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.cpu_smoke:
        env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    paths = [str(REPO)]
    if args.wheels:
        install_wheels(Path(args.wheels), Path(args.site))
        paths.append(args.site)
    env["PYTHONPATH"] = os.pathsep.join(paths + [x for x in [os.environ.get("PYTHONPATH")] if x])
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    shards = [f"data.shards={args.shards}"] if args.shards else []
    out_path = Path(args.out)
    result: dict = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu", "config": plan["config"],
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"), "work_dir": str(work)}

    def write() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n")

    info = subprocess.run([sys.executable, "-c", "import json, torch; print(json.dumps({'torch': torch.__version__, "
                           "'cuda': torch.cuda.is_available(), 'device': torch.cuda.get_device_name(0) "
                           "if torch.cuda.is_available() else 'cpu'}))"], env=env, capture_output=True, text=True)
    result["machine"] = json.loads(info.stdout) if info.returncode == 0 else {"error": info.stderr[-500:]}
    write()

    config = str(REPO / plan["config"])
    if "bench" in parts:
        cmd = [sys.executable, "-m", "ssl_ebm.bench", "--config", config, *plan["bench"], *plan["bench_overrides"],
               *shards]
        proc = run_part("bench", cmd, env, plan["timeouts"]["bench"], result)
        if proc is not None:
            bench = json.loads(proc.stdout)
            result["bench"].update({k: bench.get(k) for k in (
                "device", "sampler_backend", "graph_captures", "step_ms", "samples_per_s", "sampler_ms",
                "sampler_share", "eager_step_ms", "eager_sampler_ms", "eager_over_captured_step",
                "end_to_end_step_ms", "end_to_end_samples_per_s", "peak_memory_mb", "batch", "mixed_precision",
                "channels_last")})
        write()
    if "short" in parts:
        out = work / "short"
        overrides = [*plan["short"], *shards, f"train.out_dir={out}", "train.progress=false"]
        cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", config, *overrides]
        if run_part("short", cmd, env, plan["timeouts"]["short"], result) is not None:
            result["short"].update(train_figures(out, batch_size(overrides, plan["config"])))
        write()
    if "zero2" in parts:
        out = work / "zero2"
        overrides = [*plan["zero2"], *shards, f"train.out_dir={out}", "train.progress=false"]
        launcher = ["--config_file", str(REPO / "configs" / "accelerate" / "zero2.yaml"), "--num_processes", "1",
                    "--main_process_port", "29533"]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, str(REPO / "launch" / "train.py"),
               "--config", config, *overrides]
        if run_part("zero2", cmd, env, plan["timeouts"]["zero2"], result) is not None:
            result["zero2"].update(train_figures(out, batch_size(overrides, plan["config"])))
        write()

    result["ok"] = all(result[part]["ok"] for part in parts)
    write()
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
