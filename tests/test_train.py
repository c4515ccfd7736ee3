"""launch/train.py end to end: the default run, two processes, bitwise resume, bad input."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
import torch

from conftest import REPO, TINY, run_train

DIGITS = str(REPO / "configs" / "digits.yaml")


def tiny(shards: str, out: Path | str, *extra: str) -> list[str]:
    return ["--config", DIGITS, *TINY, f"data.shards={shards}", f"train.out_dir={out}", *extra]


def weights(ckpt_dir: Path, step: int) -> dict:
    return torch.load(ckpt_dir / f"step-{step:06d}" / "model.pt", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_default_run_writes_everything(digits_shards, tmp_path):
    out = tmp_path / "run"
    proc = run_train(tiny(digits_shards, out, "train.steps=30", "train.checkpoint_every=10"))
    assert "test accuracy" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    manifest = json.loads((Path(digits_shards) / "manifest.json").read_text())
    assert metrics["test"]["count"] == manifest["splits"]["test"]["count"] > 0
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
    assert len(metrics["test"]["per_class_accuracy"]) == 10 and "macro_f1" in metrics["test"]
    assert metrics["best_step"] in (10, 20, 30)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [5, 10, 15, 20, 25, 30]
    for r in train_records:
        for key in ("loss", "recon", "kl", "F_pos", "F_neg", "ce"):
            assert r[key] == r[key] and abs(r[key]) < 1e6, (key, r)
    assert any("val_accuracy" in r for r in records)
    assert list((out / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    assert "z_dim: 8" in (out / "config.yaml").read_text()
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts[-2:] == ["step-000020", "step-000030"] and len([c for c in ckpts if c.startswith("step")]) == 2
    assert (out / "checkpoints" / "step-000030" / "COMPLETE").exists()


def test_supervised_baseline_runs(digits_shards, tmp_path):
    out = tmp_path / "sup"
    proc = run_train(tiny(digits_shards, out, "train.steps=20", "train.method=supervised"))
    assert "supervised: test accuracy" in proc.stdout
    assert json.loads((out / "metrics.json").read_text())["method"] == "supervised"


def test_unlabelled_only_pretraining_runs_and_evaluates(digits_shards, tmp_path):
    """data.batch_labelled=0 with method ebm: the generative model alone, validation and test still run."""
    out = tmp_path / "unlabelled"
    proc = run_train(tiny(digits_shards, out, "train.steps=20", "data.batch_labelled=0", "train.cpu_threads=1"))
    assert "ebm: test accuracy" in proc.stdout
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [5, 10, 15, 20]
    for r in train_records:
        for key in ("loss", "recon", "kl", "F_pos", "F_neg"):
            assert math.isfinite(r[key]), (key, r)
        assert r["ce"] == 0 and r["acc_l"] == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["nan_skips"] == 0 and metrics["recoveries"] == 0 and metrics["best_step"] in (10, 20)
    assert metrics["test"]["count"] > 0 and 0.0 <= metrics["test"]["accuracy"] <= 1.0


def test_a_batch_part_the_method_needs_cannot_be_zero(digits_shards, tmp_path):
    _fails(run_train(tiny(digits_shards, tmp_path / "r", "data.batch_unlabelled=0"), check=False),
           "data.batch_unlabelled: is 0, but train.method 'ebm' learns from unlabelled data")


def test_graph_smoothing_changes_the_prediction_only(digits_shards, tmp_path):
    """model.graph_smoothing trains the same weights; the test split is scored with the smoothed prediction,
    and softmax f(mu) alone is recorded beside it (and equals the unsmoothed run's accuracy)."""
    args = ["train.steps=20", "train.eval_every=20", "train.cpu_threads=1"]  # one validation pass, at the end
    plain, smooth = tmp_path / "plain", tmp_path / "graph"
    run_train(tiny(digits_shards, plain, *args))
    run_train(tiny(digits_shards, smooth, *args, "model.graph_smoothing=0.9", "model.graph_pool=300"))
    m_plain, m_smooth = (json.loads((o / "metrics.json").read_text()) for o in (plain, smooth))
    assert m_plain["rank_param_checksums"] == m_smooth["rank_param_checksums"]
    assert "prior_accuracy" not in m_plain["test"]
    assert m_smooth["test"]["prior_accuracy"] == m_plain["test"]["accuracy"]
    assert m_smooth["test"]["count"] == m_plain["test"]["count"] and 0 <= m_smooth["test"]["accuracy"] <= 1
    assert m_plain["best_step"] == m_smooth["best_step"] == 20
    val = [json.loads(line) for line in (smooth / "log.jsonl").read_text().splitlines() if "val_accuracy" in line]
    assert len(val) == 1 and m_smooth["val_accuracy"] == val[0]["val_accuracy"]
    assert val[0]["val_prior_accuracy"] == m_plain["val_accuracy"]


PSEUDO = ["model.graph_smoothing=0.9", "model.graph_pool=300", "model.pseudo_label_weight=1",
          "model.pseudo_label_start=8", "model.pseudo_label_every=8"]


def test_pseudo_labels_start_on_time_and_a_paused_run_resumes_them_exactly(digits_shards, tmp_path):
    """model.pseudo_label_weight: no term before pseudo_label_start, a term after; the graph is rebuilt at 8 and
    16 and kept in the checkpoints from 8 on (graph.pt), so a run paused at 12 (its graph from 8) and resumed
    ends with exactly the uninterrupted run's weights."""
    args = ["train.steps=20", "train.log_every=1", "train.checkpoint_every=4", "train.eval_every=0",
            "train.cpu_threads=1", *PSEUDO]
    whole, paused = tmp_path / "whole", tmp_path / "paused"
    run_train(tiny(digits_shards, whole, *args))
    records = [json.loads(line) for line in (whole / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert all(r["pseudo"] == 0 for r in records if r["step"] <= 8)  # step 8's batch precedes the first graph
    assert all(r["pseudo"] > 0 for r in records if r["step"] > 8)
    assert (whole / "checkpoints" / "step-000020" / "graph.pt").exists()
    run_train(tiny(digits_shards, paused, *args, "train.stop_after=12"))
    assert (paused / "checkpoints" / "step-000012" / "graph.pt").exists()
    run_train(tiny(digits_shards, paused, *args))
    assert_same_weights(weights(whole / "checkpoints", 20), weights(paused / "checkpoints", 20))
    graphs = [torch.load(o / "checkpoints" / "step-000020" / "graph.pt", weights_only=True) for o in (whole, paused)]
    assert_same_weights(*graphs)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["model.vat_weight=1"], ["model.graph_smoothing=0.9", "model.graph_pool=300"],
                                   PSEUDO], ids=["paper", "vat_term", "graph", "pseudo_labels"])
def test_two_processes_train_together(digits_shards, tmp_path, extra):
    """Two DDP processes end with the same weights; the VAT term's power iteration (a gradient inside the
    forward) keeps them so too; graph smoothing's evaluation (each rank builds the graph itself) runs."""
    out = tmp_path / "ddp"
    run_train(tiny(digits_shards, out, "train.steps=20", "train.checkpoint_every=10", *extra), nproc=2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2
    a, b = metrics["rank_param_checksums"]
    assert a == b, "ranks ended with different parameters"
    step = out / "checkpoints" / "step-000020"
    assert (step / "rank-00000.pt").exists() and (step / "rank-00001.pt").exists()
    chains = [torch.load(step / f"rank-{r:05d}.pt", weights_only=False)["bank"]["z"] for r in (0, 1)]
    assert not torch.equal(chains[0], chains[1]), "each rank keeps its own persistent chains"
    for r in (json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()):
        assert all(v == v for v in r.values() if isinstance(v, float)), r


@pytest.mark.slow
def test_prior_gradient_two_processes_equals_union(tmp_path):
    script = str(REPO / "tests" / "scripts" / "prior_grad.py")
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, script, str(one)], check=True, cwd=REPO, env=env, capture_output=True)
    from conftest import free_port

    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()), script, str(two)],
        cwd=REPO, env={**env, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    g1, g2 = torch.load(one), torch.load(two)
    assert g1["num_processes"] == 1 and g2["num_processes"] == 2
    assert g1["grads"].keys() == g2["grads"].keys()
    for name, grad in g1["grads"].items():
        torch.testing.assert_close(g2["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_kill9_then_resume_is_bitwise_identical(digits_shards, tmp_path):
    steps = 60
    args = [f"train.steps={steps}", "train.checkpoint_every=5", "train.eval_every=0"]
    ref = tmp_path / "ref"
    run_train(tiny(digits_shards, ref, *args))

    out = tmp_path / "killed"
    # kill -9 at a random point in the run, possibly in the middle of writing the next checkpoint
    kill9_after([sys.executable, str(REPO / "launch" / "train.py"), *tiny(digits_shards, out, *args)], out,
                random.Random().choice([10, 15, 20, 25]))
    assert not (out / "checkpoints" / f"step-{steps:06d}").exists(), "killed too late to test anything"
    run_train(tiny(digits_shards, out, *args))  # resume=auto is the default
    assert_same_end(ref, out, steps)


def test_resume_with_a_loader_worker_is_bitwise_identical(digits_shards, tmp_path):
    """data.workers=1: a run resumed from step 5 ends at step 10 with the uninterrupted run's weights and
    chains (the loader's iterator, created at the first step of each run, must not draw on the training RNG)."""
    args = ["data.workers=1", "train.steps=10", "train.checkpoint_every=5", "train.eval_every=0"]
    ref = tmp_path / "ref"
    run_train(tiny(digits_shards, ref, *args))
    out = tmp_path / "resumed"
    shutil.copytree(ref / "checkpoints" / "step-000005", out / "checkpoints" / "step-000005")
    resumed = run_train(tiny(digits_shards, out, *args))
    assert "resumed from" in resumed.stdout and "at step 5" in resumed.stdout
    assert_same_end(ref, out, 10)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_a_stop_signal_during_start_up_exits_75_and_writes_nothing(digits_shards, tmp_path, sig):
    """SLURM's warning 1.5 s after start, while the script still imports its libraries: held until main()
    installs its handlers, then the run stops at its first safe point with the requeue status, before any
    step or checkpoint (not status 128 + signal, which the batch script would not requeue)."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), *tiny(digits_shards, out, "train.steps=200")]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, (proc.returncode, stderr[-3000:])
    assert "stop signal received during start-up" in stdout, stdout
    assert not list((out / "checkpoints").glob("*")), "no checkpoint, complete or not"
    assert not (out / "config.yaml").exists() and not (out / "log.jsonl").exists()


def kill9_after(cmd: list[str], out: Path, step: int) -> None:
    """Start `cmd`, and kill -9 it as soon as checkpoint step-<step> is complete."""
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoints" / f"step-{step:06d}" / "COMPLETE").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGSTOP)  # freeze at once, then kill -9 wherever the poll caught it
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def assert_same_end(ref: Path, out: Path, steps: int) -> None:
    """Both runs end with bitwise the same weights and persistent chains at step-<steps>."""
    assert_same_weights(weights(ref / "checkpoints", steps), weights(out / "checkpoints", steps))
    final = f"step-{steps:06d}"
    ref_bank = torch.load(ref / "checkpoints" / final / "rank-00000.pt", weights_only=False)["bank"]
    out_bank = torch.load(out / "checkpoints" / final / "rank-00000.pt", weights_only=False)["bank"]
    assert torch.equal(ref_bank["z"], out_bank["z"]), "persistent chains differ after resume"


# ----------------------------------------------------------------------------- gradient accumulation

# 30 updates of 2 micro-batches each; cosine schedule after 4 warm-up updates.
ACCUM = ["train.grad_accum=2", "train.steps=30", "train.checkpoint_every=5", "train.eval_every=0", "train.log_every=1",
         "optim.schedule=cosine", "optim.warmup_steps=4"]


@pytest.fixture(scope="module")
def accum_ref(digits_shards, tmp_path_factory) -> Path:
    """The uninterrupted run with ACCUM, for the tests below to compare with."""
    out = tmp_path_factory.mktemp("accum") / "ref"
    run_train(tiny(digits_shards, out, *ACCUM))
    return out


def test_grad_accum_steps_and_schedule_count_updates(accum_ref):
    """log.jsonl steps are updates; warm-up lasts optim.warmup_steps updates; the cosine ends on the last."""
    from ssl_ebm import config as C
    from ssl_ebm.state import lr_factor

    cfg = C.load_config(DIGITS, ACCUM)
    factor = lr_factor(cfg.optim, cfg.train.steps)
    train_log = [r for r in map(json.loads, (accum_ref / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in train_log] == list(range(1, 31))
    # lr_prior logged after update s is the rate of update s + 1: base x factor(s)
    assert [r["lr_prior"] for r in train_log] == [cfg.optim.lr_prior * factor(s) for s in range(1, 31)]
    base = cfg.optim.lr_prior
    assert [r["lr_prior"] / base for r in train_log[:4]] == [0.5, 0.75, 1.0, 1.0]  # updates 1-4 at 1/4 .. 4/4
    assert 0 < train_log[-2]["lr_prior"] < 0.01 * base and train_log[-1]["lr_prior"] == 0.0
    sched = torch.load(accum_ref / "checkpoints" / "step-000030" / "optimizer.pt", weights_only=False)["scheduler"]
    assert sched["last_epoch"] == 30, "one schedule step per update"


@pytest.mark.slow
def test_grad_accum_kill9_then_resume_is_bitwise_identical(digits_shards, accum_ref, tmp_path):
    """Checkpoints fall on window boundaries, and the resumed stream starts at 2 x the step."""
    out = tmp_path / "killed"
    kill9_after([sys.executable, str(REPO / "launch" / "train.py"), *tiny(digits_shards, out, *ACCUM)], out,
                random.Random().choice([5, 15]))
    assert not (out / "checkpoints" / "step-000030").exists(), "killed too late to test anything"
    run_train(tiny(digits_shards, out, *ACCUM))
    assert_same_end(accum_ref, out, 30)


@pytest.mark.slow
def test_grad_accum_stop_signal_finishes_the_window_then_resumes_identically(digits_shards, accum_ref, tmp_path):
    """SIGTERM in micro-batch 15, the first of update 8: update 8 is finished, step-000008 written, status 75;
    the resumed run ends as the uninterrupted one."""
    out = tmp_path / "stopped"
    script = REPO / "tests" / "scripts" / "train_with_micro_fault.py"
    proc = run_train(["15", "TERM", *tiny(digits_shards, out, *ACCUM)], script=script, check=False)
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "checkpoint at step 8 written" in proc.stdout
    assert max(p.parent.name for p in (out / "checkpoints").glob("step-*/COMPLETE")) == "step-000008"
    again = run_train(tiny(digits_shards, out, *ACCUM))
    assert "resumed from" in again.stdout and "at step 8" in again.stdout
    assert_same_end(accum_ref, out, 30)


def test_stop_after_pauses_and_resume_continues_the_same_run(digits_shards, accum_ref, tmp_path):
    """train.stop_after=15 of 30 updates: validated, checkpointed and tested there, metrics.json says so, and
    the same command without it continues to exactly the uninterrupted run (the cosine schedule spans 30)."""
    out = tmp_path / "paused"
    run_train(tiny(digits_shards, out, *ACCUM, "train.stop_after=15"))  # validates at the pause all the same
    paused = json.loads((out / "metrics.json").read_text())
    assert paused["paused_at"] == 15 and paused["best_step"] == 15 and paused["steps"] == 30
    assert (out / "checkpoints" / "step-000015" / "COMPLETE").exists()
    assert not (out / "checkpoints" / "step-000020").exists()
    run_train(tiny(digits_shards, out, *ACCUM))
    assert "paused_at" not in json.loads((out / "metrics.json").read_text())
    assert_same_end(accum_ref, out, 30)


def test_grad_accum_update_is_the_mean_over_the_window(digits_shards, tmp_path):
    """The supervised loss (no negatives) is exactly comparable: 2 micro-batches of 8 labelled examples give
    the update of one batch of 16, with the gradient averaged over the window, not summed."""
    common = ["train.method=supervised", "train.steps=3", "train.log_every=1", "train.eval_every=0",
              "train.log_with=none"]
    one, two = tmp_path / "one", tmp_path / "two"
    _train_in_process(digits_shards, str(one), *common, "data.batch_labelled=16")
    _train_in_process(digits_shards, str(two), *common, "data.batch_labelled=8", "train.grad_accum=2")
    logs = [[r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
            for out in (one, two)]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == [1, 2, 3]
    for a, b in zip(*logs):
        for key in ("loss", "ce", "grad_norm_encoder", "grad_norm_prior"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key, a[key], b[key])
    w1, w2 = weights(one / "checkpoints", 3), weights(two / "checkpoints", 3)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6, msg=k)


def _train_in_process(shards: str, out: str, *extra: str) -> dict:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    sys.path.insert(0, str(REPO / "launch"))
    import train as train_script

    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()
    from ssl_ebm import config as C

    raw = C.raw_tree(DIGITS, [*TINY, f"data.shards={shards}", f"train.out_dir={out}", *extra])
    return train_script.train(C.from_dict(C.Config, raw), raw)


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_checkpoints_resume_and_survive_a_crash_mid_save(digits_shards, monkeypatch, tmp_path, scheme):
    from ssl_ebm import checkpoint

    base = f"memory://crash-test-{os.getpid()}" if scheme == "memory" else f"file://{tmp_path}"
    args = ["train.steps=30", "train.checkpoint_every=10", "train.eval_every=0"]
    _train_in_process(digits_shards, f"{base}/ref", *args)

    # A crash during the save at step 20: files written, COMPLETE never reached.
    real_mark = checkpoint.CheckpointStore.mark_complete

    def crash_at_20(self, name):
        if name == "step-000020":
            raise KeyboardInterrupt("killed mid-save")
        real_mark(self, name)

    monkeypatch.setattr(checkpoint.CheckpointStore, "mark_complete", crash_at_20)
    with pytest.raises(KeyboardInterrupt):
        _train_in_process(digits_shards, f"{base}/crash", *args)
    monkeypatch.setattr(checkpoint.CheckpointStore, "mark_complete", real_mark)
    store = checkpoint.CheckpointStore(f"{base}/crash/checkpoints")
    assert store.exists("step-000020", "model.pt"), "the crash happened mid-save"
    assert store.latest() == "step-000010", "a half-written save must not look complete"
    assert store.read_torch("step-000010", "model.pt"), "the previous checkpoint stays loadable"

    _train_in_process(digits_shards, f"{base}/crash", *args)  # resume=auto from step 10
    ref = checkpoint.CheckpointStore(f"{base}/ref/checkpoints").read_torch("step-000030", "model.pt")
    assert_same_weights(ref, store.read_torch("step-000030", "model.pt"))
    if scheme == "memory":
        fsspec.filesystem("memory").rm(base.removeprefix("memory://"), recursive=True)


# ----------------------------------------------------------------------------- bad input


def _fails(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("override, fragment", [
    ("train.stpes=5", "train.stpes: unknown config key; did you mean 'train.steps'"),
    ("train.steps=five", "train.steps: expected an integer"),
    ("train.stop_after=50000", "train.stop_after: got 50000; must be between 0"),
    ("model.encoder=vgg", "model.encoder: unknown value 'vgg'"),
])
def test_bad_config_is_one_line(digits_shards, tmp_path, override, fragment):
    _fails(run_train(tiny(digits_shards, tmp_path / "r", override), check=False), fragment)


def test_model_shape_that_contradicts_the_shards_is_one_line(digits_shards, tmp_path):
    proc = run_train(tiny(digits_shards, tmp_path / "r", "model.x_shape=[32]"), check=False)
    _fails(proc, f"model.x_shape: config says (32,) but the shards at {digits_shards} hold (64,); remove "
                 "model.x_shape to take it from the data")


def test_missing_shards_is_one_line(tmp_path):
    proc = run_train(tiny(str(tmp_path / "nowhere"), tmp_path / "r", "data.dataset="), check=False)
    _fails(proc, str(tmp_path / "nowhere"))


def test_unwritable_checkpoint_location_detected_before_training(digits_shards, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = run_train(tiny(digits_shards, tmp_path / "r", f"train.checkpoint_dir={blocker}/ckpt"), check=False)
    _fails(proc, "not writable")
    assert not (tmp_path / "r" / "log.jsonl").exists(), "training must not start"


def test_nan_loss_stops_with_the_step_and_keeps_checkpoints(digits_shards, tmp_path):
    out = tmp_path / "nan"
    # An absurd prior learning rate makes the energies overflow after the first update.
    proc = run_train(tiny(digits_shards, out, "optim.lr_prior=1e30", "train.steps=20", "train.checkpoint_every=1",
                          "health.watchdog=false"), check=False)
    _fails(proc, "non-finite loss")
    assert "at step 2" in proc.stderr
    assert (out / "checkpoints" / "step-000001" / "COMPLETE").exists(), "what was saved before stays"


def test_nan_loss_skip_counts_then_gives_up(digits_shards, tmp_path):
    proc = run_train(tiny(digits_shards, tmp_path / "skip", "optim.lr_prior=1e30", "train.steps=20",
                          "train.on_nan=skip", "train.max_nan_skips=3", "health.watchdog=false"), check=False)
    _fails(proc, "4 non-finite losses by step 5")


def test_a_skipped_update_still_steps_the_schedule(digits_shards, tmp_path):
    """train.on_nan=skip: the update whose loss is NaN (micro-batch 3) is not applied but counts, as the watchdog's
    skipped steps do; the learning rate logged after update s stays base x factor(s) (cosine after 4 warm-up
    updates), not one update behind per skip."""
    from ssl_ebm import config as C
    from ssl_ebm.state import lr_factor

    args = ["train.steps=8", "train.log_every=1", "train.eval_every=0", "train.on_nan=skip", "health.watchdog=false",
            "optim.schedule=cosine", "optim.warmup_steps=4"]
    out = tmp_path / "skip"
    run_train(["3", "NAN", *tiny(digits_shards, out, *args)], script=REPO / "tests" / "scripts" / "train_with_micro_fault.py")
    cfg = C.load_config(DIGITS, args)
    factor = lr_factor(cfg.optim, cfg.train.steps)
    train_log = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["nan_skips"] for r in train_log] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert [r["lr_prior"] for r in train_log] == [cfg.optim.lr_prior * factor(s) for s in range(1, 9)]
    assert train_log[-1]["lr_prior"] == 0.0  # the cosine still ends on the last update

