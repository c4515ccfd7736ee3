"""Preemption and SLURM: SIGTERM -> checkpoint -> status 75 -> requeue -> resume; two "nodes" on loopback.

SLURM itself is not here: fake `srun` (runs the step's command once per node, SLURM_NODEID set, and
forwards signals as srun does) and `scontrol` (host names, requeue) go first on PATH.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY, free_port, run_train

DIGITS = str(REPO / "configs" / "digits.yaml")
SLURM = REPO / "launch" / "slurm"
REQUEUE = 75

FAKE_SRUN = r"""#!/usr/bin/env bash
# srun: the step's command once per node, SLURM_NODEID = 0..N-1; signals forwarded to the tasks.
echo "srun $*" >> "$FAKE_LOG"
while [[ $1 == --* ]]; do shift; done
pids=()
trap 'kill -USR1 "${pids[@]}"' USR1
trap 'kill -TERM "${pids[@]}"' TERM
for ((n = 0; n < SLURM_JOB_NUM_NODES; n++)); do SLURM_NODEID=$n "$@" & pids+=($!); done
status=0
for p in "${pids[@]}"; do
  while :; do wait "$p"; s=$?; kill -0 "$p" 2>/dev/null || break; done
  [ "$s" -ne 0 ] && status=$s
done
exit "$status"
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
case "$1" in
  show) echo "${FAKE_HOSTS:-127.0.0.1}" | tr ',' '\n' ;;
  requeue) echo "requeue $2" >> "$FAKE_LOG" ;;
  *) echo "fake scontrol: $*" >&2; exit 1 ;;
esac
"""

# Stands in for `python launch/slurm/accelerate_launch.py ...` on each node: records its arguments, then
# exits with FAKE_STATUS, or waits for USR1 and exits 75 as the trainers do. With FAKE_STARTUP=S it first
# spends S seconds as a process that does not catch USR1 yet (and would die of it), as Python does at first.
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "python $*" >> "$FAKE_LOG"
if [ "${FAKE_STATUS:-wait}" != wait ]; then exit "$FAKE_STATUS"; fi
sleep "${FAKE_STARTUP:-0}"
trap 'echo "trainer got USR1" >> "$FAKE_LOG"; exit 75' USR1
touch "$FAKE_LOG.started.${SLURM_NODEID:-0}"
for i in $(seq 600); do sleep 0.1; done
exit 0
"""


@pytest.fixture
def fake_slurm(tmp_path) -> dict:
    """PATH with fake srun/scontrol, a fake python for the launcher, and the job's SLURM variables."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL, "fake-python": FAKE_PYTHON}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "slurm.log"
    log.touch()
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log),
            "PYTHON": str(bin_dir / "fake-python"), "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2",
            "SLURM_JOB_NODELIST": "node[001-002]", "FAKE_HOSTS": "node001,node002", "GPUS_PER_NODE": "4",
            "SLURM_SUBMIT_DIR": str(REPO), "OMP_NUM_THREADS": "1"}


def kill_tree(proc: subprocess.Popen) -> str:
    """SIGKILL `proc` and every process below it (trainers run in their own sessions); its output."""
    def children(pid: int) -> list[int]:
        kids = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids += [int(entry), *children(int(entry))]
        return kids

    for pid in [*children(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.communicate()[0] or ""


def finish(proc: subprocess.Popen, timeout: float) -> str:
    """Output of `proc` once it exits; after `timeout` s kill it and everything it started, and fail."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout:.0f} s:\n{kill_tree(proc)[-5000:]}") from None


def sbatch(script: str, env: dict, *args: str, **kw) -> subprocess.Popen:
    """Run a batch script as SLURM's batch step would (bash, in the submit directory)."""
    return subprocess.Popen(["bash", str(SLURM / script), *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def log_lines(env: dict) -> list[str]:
    return Path(env["FAKE_LOG"]).read_text().splitlines()


@pytest.mark.parametrize("script", ["multinode.sbatch", "single_node.sbatch"])
def test_batch_scripts_are_valid_bash_and_ask_for_requeue_and_warning(script):
    subprocess.run(["bash", "-n", str(SLURM / script)], check=True)
    text = (SLURM / script).read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@" in text


@pytest.mark.parametrize("script", ["multinode.sbatch", "single_node.sbatch"])
@pytest.mark.parametrize("status", [0, 1, REQUEUE])
def test_requeue_only_on_status_75(fake_slurm, script, status):
    env = {**fake_slurm, "FAKE_STATUS": str(status)}
    proc = sbatch(script, env, "configs/digits.yaml", "train.steps=7")
    out = finish(proc, 60)
    assert proc.returncode == status, out
    requeues = [line for line in log_lines(env) if line.startswith("requeue")]
    assert requeues == (["requeue 4242"] if status == REQUEUE else []), out


def test_multinode_command_line_per_node(fake_slurm):
    env = {**fake_slurm, "FAKE_STATUS": "0", "MAIN_PORT": "29999"}
    proc = sbatch("multinode.sbatch", env, "configs/digits.yaml", "train.steps=7", "model.z_dim=4")
    out = finish(proc, 60)
    assert proc.returncode == 0, out
    launches = sorted(line for line in log_lines(env) if line.startswith("python"))
    assert len(launches) == 2, launches
    for rank, line in enumerate(launches):
        assert line == ("python launch/slurm/accelerate_launch.py --config_file configs/accelerate/multi_node.yaml "
                        f"--num_machines 2 --num_processes 8 --machine_rank {rank} --main_process_ip node001 "
                        "--main_process_port 29999 launch/train.py --config configs/digits.yaml train.steps=7 "
                        "model.z_dim=4")


@pytest.mark.parametrize("script", ["multinode.sbatch", "single_node.sbatch"])
def test_time_limit_warning_reaches_the_trainers_and_requeues(fake_slurm, script):
    env = fake_slurm  # the fake trainers wait for USR1 and exit 75
    proc = sbatch(script, env, "configs/digits.yaml")
    nodes = 2 if script == "multinode.sbatch" else 1
    started = [Path(f"{env['FAKE_LOG']}.started.{n}") for n in range(nodes)]
    deadline = time.time() + 30
    while not all(p.exists() for p in started):
        if time.time() > deadline or proc.poll() is not None:
            raise AssertionError(f"the fake trainers never started:\n{kill_tree(proc)}")
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@120` sends to the batch shell
    out = finish(proc, 30)
    assert proc.returncode == REQUEUE, out
    lines = log_lines(env)
    assert lines.count("trainer got USR1") == nodes, lines
    assert "requeue 4242" in lines


@pytest.mark.parametrize("script", ["multinode.sbatch", "single_node.sbatch"])
def test_a_warning_before_the_launchers_catch_it_waits_for_them_and_requeues(fake_slurm, script):
    """USR1 while the launchers are starting and would die of it: the batch shell (and each node's task) keeps
    it and passes it on once the launcher catches it, so the trainers still stop at a checkpoint."""
    env = {**fake_slurm, "FAKE_STARTUP": "3"}
    proc = sbatch(script, env, "configs/digits.yaml")
    nodes = 2 if script == "multinode.sbatch" else 1
    deadline = time.time() + 30
    while sum(line.startswith("python") for line in log_lines(env)) < nodes:
        if time.time() > deadline or proc.poll() is not None:
            raise AssertionError(f"the fake launchers never started:\n{kill_tree(proc)}")
        time.sleep(0.05)
    assert not Path(f"{env['FAKE_LOG']}.started.0").exists(), "the fake launcher caught USR1 too early for this test"
    proc.send_signal(signal.SIGUSR1)
    out = finish(proc, 30)
    assert proc.returncode == REQUEUE, out
    lines = log_lines(env)
    assert lines.count("trainer got USR1") == nodes, lines
    assert "requeue 4242" in lines


def test_a_warning_before_the_step_exists_is_kept(fake_slurm, tmp_path):
    """USR1 to the batch shell before it has started its step at all (here: while it asks scontrol for the
    host names) is kept and reaches the trainers once they can take it."""
    slow = tmp_path / "slow-bin"
    slow.mkdir()
    (slow / "scontrol").write_text(f"#!/usr/bin/env bash\ntouch \"$FAKE_LOG.scontrol\"\nsleep 2\n"
                                   f"exec {Path(fake_slurm['PATH'].split(':')[0]) / 'scontrol'} \"$@\"\n")
    (slow / "scontrol").chmod(0o755)
    env = {**fake_slurm, "PATH": f"{slow}:{fake_slurm['PATH']}"}
    proc = sbatch("multinode.sbatch", env, "configs/digits.yaml")
    deadline = time.time() + 30
    while not Path(f"{env['FAKE_LOG']}.scontrol").exists():
        if time.time() > deadline or proc.poll() is not None:
            raise AssertionError(f"the batch script never asked scontrol:\n{kill_tree(proc)}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out = finish(proc, 30)
    assert proc.returncode == REQUEUE, out
    assert log_lines(env).count("trainer got USR1") == 2, log_lines(env)


# ----------------------------------------------------------------------------- real training runs


def tiny(shards: str, out: Path, *extra: str) -> list[str]:
    return ["--config", DIGITS, *TINY, f"data.shards={shards}", f"train.out_dir={out}", "train.log_every=1", *extra]


def logged_steps(out: Path) -> list[int]:
    path = out / "log.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def stop_after(proc: subprocess.Popen, out: Path, sig: int, min_step: int = 3) -> tuple[str, float]:
    """Wait until `min_step` steps are logged, send `sig` to `proc`; (output, seconds to exit)."""
    deadline = time.time() + 240
    while max(logged_steps(out), default=0) < min_step:
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"training ended or stalled before step {min_step}:\n{kill_tree(proc)[-4000:]}")
        time.sleep(0.2)
    t0 = time.time()
    proc.send_signal(sig)
    out_text = finish(proc, 60)
    return out_text, time.time() - t0


def complete_steps(out: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*/COMPLETE"))


@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_and_resumes(digits_shards, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "train.py"), *tiny(digits_shards, out, "train.steps=100000")],
                            cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    text, seconds = stop_after(proc, out, signal.SIGTERM)
    assert proc.returncode == REQUEUE, text
    assert seconds < 30, f"took {seconds:.1f} s from SIGTERM to exit"
    steps = complete_steps(out)
    assert steps and steps[-1] >= 3, steps
    stopped = steps[-1]
    assert f"checkpoint at step {stopped}" in text and "status 75" in text
    meta = json.loads((out / "checkpoints" / f"step-{stopped:06d}" / "meta.json").read_text())
    assert meta["step"] == stopped

    again = run_train(tiny(digits_shards, out, f"train.steps={stopped + 3}"))  # resume=auto
    assert f"at step {stopped}" in again.stdout and "resumed from" in again.stdout
    assert logged_steps(out) == list(range(1, stopped + 4))


@pytest.mark.slow
def test_launcher_forwards_the_warning_to_zero2_trainers_and_passes_75_on(digits_shards, tmp_path):
    """SLURM's warning reaches the launcher (srun forwards it to its task); 2 DeepSpeed trainers stop together."""
    out = tmp_path / "zero2"
    cmd = [sys.executable, str(SLURM / "accelerate_launch.py"), "--config_file", "configs/accelerate/zero2.yaml",
           "--num_processes", "2", "--main_process_port", str(free_port()), "launch/train.py",
           *tiny(digits_shards, out, "train.steps=100000")]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    text, seconds = stop_after(proc, out, signal.SIGUSR1)
    assert proc.returncode == REQUEUE, text[-4000:]
    assert seconds < 30, f"took {seconds:.1f} s from SIGUSR1 to exit"
    stopped = complete_steps(out)[-1]
    ckpt = out / "checkpoints" / f"step-{stopped:06d}"
    assert json.loads((ckpt / "meta.json").read_text())["zero_stage"] == 2
    assert sorted(p.name for p in ckpt.glob("rank-*.pt")) == ["rank-00000.pt", "rank-00001.pt"]
    assert len(list((ckpt / "deepspeed").rglob("*optim_states.pt"))) == 2


def test_a_warning_while_the_launcher_starts_reaches_the_trainer_and_requeues(digits_shards, tmp_path):
    """SIGUSR1 1.5 s after the launcher starts (while it imports, before any trainer exists): the launcher keeps
    it, passes it to the trainer once the trainer holds or handles it, and the trainer stops before its first
    step with status 75, which the launcher passes on."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(SLURM / "accelerate_launch.py"), "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "launch/train.py",
           *tiny(digits_shards, out, "train.steps=100000")]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    time.sleep(1.5)
    proc.send_signal(signal.SIGUSR1)
    text = finish(proc, 120)
    assert proc.returncode == REQUEUE, text[-4000:]
    assert "stop signal received during start-up" in text, text[-4000:]
    assert not logged_steps(out) and not list((out / "checkpoints").glob("*"))


@pytest.mark.slow
@pytest.mark.parametrize("launcher_config,stage", [("multi_node.yaml", 0), ("zero2.yaml", 2)])
def test_two_nodes_on_loopback_train_together(fake_slurm, digits_shards, tmp_path, launcher_config, stage):
    """multinode.sbatch for real: 2 machines (ranks 0 and 1) x 1 process, rendezvous on 127.0.0.1."""
    out = tmp_path / "two_nodes"
    env = {**fake_slurm, "PYTHON": sys.executable, "FAKE_HOSTS": "127.0.0.1", "GPUS_PER_NODE": "1",
           "MAIN_PORT": str(free_port()), "ACCELERATE_CONFIG": f"configs/accelerate/{launcher_config}"}
    proc = sbatch("multinode.sbatch", env, DIGITS, *tiny(digits_shards, out, "train.steps=10")[2:])
    text = finish(proc, 180)
    assert proc.returncode == 0, text[-5000:]
    srun = [line for line in log_lines(env) if line.startswith("srun")]
    assert len(srun) == 1 and not any(line.startswith("requeue") for line in log_lines(env))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2, "the two machines did not form one group"
    checksums = metrics["rank_param_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1], checksums
    assert logged_steps(out) == list(range(1, 11))
    assert json.loads((out / "checkpoints" / "step-000010" / "meta.json").read_text())["zero_stage"] == stage
