"""Shared test fixtures: the tiny digits run every end-to-end test starts from."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# A small, fast version of configs/digits.yaml (seconds per run on 2 CPU cores).
TINY = [
    "model.z_dim=8", "model.hidden=64", "model.prior_hidden=64",
    "sampler.steps=5", "sampler.bank_size=500",
    "data.batch_unlabelled=64", "data.batch_labelled=16",
    "train.log_every=5", "train.eval_every=10", "train.progress=false",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(args: list[str], *, nproc: int = 1, check: bool = True, timeout: int = 600,
              env: dict | None = None, launcher: list[str] | None = None,
              script: Path | None = None) -> subprocess.CompletedProcess:
    """Run launch/train.py as a user would: plain python, or `accelerate launch` with nproc CPU processes.

    `launcher`: `accelerate launch` arguments in place of the gloo DDP recipe, e.g.
    `["--config_file", "configs/accelerate/zero2.yaml"]` for DeepSpeed (which finds the CPU itself).
    `script`: a test script that wraps launch/train.py (tests/scripts/train_with_fault.py).
    """
    script = script or REPO / "launch" / "train.py"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if nproc == 1 and launcher is None:
        cmd = [sys.executable, str(script), *args]
    else:
        if launcher is None:  # the launch recipe of shared/NOTES.md: gloo DDP on CPU
            full_env["ACCELERATE_USE_CPU"] = "1"
            launcher = ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", str(nproc),
               "--main_process_port", str(free_port()), str(script), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> str:
    """Digits shards built once per test session (100 labels, seed 0)."""
    from shards.make import build

    out = str(tmp_path_factory.mktemp("digits") / "shards")
    build("digits", out, num_labelled=100, seed=0)
    return out
