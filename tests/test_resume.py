"""ssl_ebm/resume.py: run ids keep runs apart, a resume drops the dead timeline, a checkpoint of another model
config is one line, and a DDP checkpoint resumes on another process count (real `accelerate launch`)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, run_train
from ssl_ebm.checkpoint import CheckpointError, CheckpointStore
from ssl_ebm.resume import batches_read, data_offset, pool_chains, prune_best, refuse_foreign

DIGITS = str(REPO / "configs" / "digits.yaml")


def tiny(shards: str, out: Path | str, *extra: str) -> list[str]:
    return ["--config", DIGITS, *TINY, f"data.shards={shards}", f"train.out_dir={out}", *extra]


def one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def bank(ckpt: Path, name: str, rank: int) -> torch.Tensor:
    return torch.load(ckpt / name / f"rank-{rank:05d}.pt", weights_only=False)["bank"]["z"]


def finite_metrics(out: Path, processes: int) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == processes and math.isfinite(metrics["test"]["accuracy"])
    for r in (json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()):
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
    return metrics


# ----------------------------------------------------------------------------- pieces


def test_pooled_chains_interleave_every_old_rank_and_split_without_overlap():
    banks = [torch.full((4, 2), float(r)) + torch.arange(4.0)[:, None] * 10 for r in range(2)]  # rank r, chain i
    one = pool_chains(banks, 0, 1)
    assert one[:, 0].tolist() == [0, 1, 10, 11, 20, 21, 30, 31]  # chain 0 of ranks 0, 1, then chain 1, ...
    shares = [pool_chains(banks, r, 3) for r in range(3)]
    assert sorted(torch.cat(shares)[:, 0].tolist()) == sorted(one[:, 0].tolist())
    assert [len(s) for s in shares] == [3, 3, 2]


def test_data_offset_keeps_the_epoch_position_whatever_the_grad_accum():
    # 2 ranks read 10 batches each = 20 rank-batches; on 1 rank that is batch 20, on 4 ranks batch 5.
    assert 10 + data_offset(10, 10, 1, 2, 1) == 20
    assert 10 + data_offset(10, 10, 1, 2, 4) == 5
    assert 30 + data_offset(40, 30, 1, 2, 1) == 80  # batch 40 of the 2-rank stream: an earlier offset carries over
    # train.grad_accum changed on resume: the loop starts at step x the NEW grad_accum + offset
    assert 2 * 10 + data_offset(10, 10, 2, 1, 1) == 10  # 1 process, 1 -> 2: batch 10 still, not 20
    assert 1 * 10 + data_offset(20, 10, 1, 1, 1) == 20  # 1 process, 2 -> 1: batch 20 still, not 10 (no replay)
    assert 2 * 10 + data_offset(10, 10, 2, 2, 1) == 20  # 2 processes at 1 -> 1 at 2: the same examples per update
    assert 1 * 10 + data_offset(20, 10, 1, 1, 2) == 10  # and back


def test_batches_read_of_a_checkpoint_without_the_count_uses_its_own_grad_accum(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    _save(store, "step", 10, data_offset=4)
    store.write_bytes("step-000010", "config.yaml", b"train:\n  grad_accum: 3\n")
    assert batches_read({"step": 10, "data_offset": 4}, store, "step-000010") == 34  # 10 x 3 + 4, whatever this run's
    assert batches_read({"step": 10, "batches_read": 12}, store, "step-000010") == 12


def _save(store: CheckpointStore, kind: str, step: int, **meta) -> str:
    name = store.dir_name(kind, step)
    store.write_json(name, "meta.json", {"step": step, **meta})
    store.mark_complete(name)
    return name


def test_prune_best_keeps_the_best_the_newest_step_checkpoint_refers_to(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    for step in (5, 10):
        _save(store, "best", step)
    _save(store, "step", 10, best_step=10)
    _save(store, "best", 15)
    prune_best(store)  # step-10 refers to best-10: a resume from it needs best-10, not only the newest
    assert [n for _, n in store.complete("best")] == ["best-000010", "best-000015"]


def test_checkpoints_of_another_run_beside_the_resumed_ones_are_refused(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    _save(store, "step", 10, run_id="aaaa")
    _save(store, "best", 30, run_id="bbbb")
    with pytest.raises(CheckpointError, match=r"holds checkpoints of another run \(best-000030\)"):
        refuse_foreign(store, "aaaa")


# ----------------------------------------------------------------------------- end to end, one process


@pytest.fixture(scope="module")
def finished_run(digits_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    run_train(tiny(digits_shards, out, "train.steps=10"))
    return out


def test_a_fresh_run_into_a_directory_with_checkpoints_is_refused(digits_shards, finished_run, tmp_path):
    ckpt = finished_run / "checkpoints"
    before = sorted(p.name for p in ckpt.iterdir())
    proc = run_train(tiny(digits_shards, tmp_path / "other", "train.steps=10", "train.resume=never",
                          f"train.checkpoint_dir={ckpt}"), check=False)
    line = one_error(proc)
    assert line == (f"error: train.resume=never {ckpt} already holds checkpoints of another run (step-000000, "
                    "step-000010, best-000010); use another train.checkpoint_dir (or train.out_dir), delete those "
                    "checkpoints, or set train.resume=auto to continue that run"), line
    assert sorted(p.name for p in ckpt.iterdir()) == before, "nothing already written is touched"
    assert not (tmp_path / "other" / "config.yaml").exists()


def test_a_fresh_run_over_incomplete_checkpoints_of_another_keeps_none_of_their_files(digits_shards, tmp_path):
    """Only incomplete checkpoints of another run (killed mid-save, with 2 processes, ZeRO and an average): the
    fresh run may start (nothing there can be resumed), and its step-000005, written into the same-named
    directory, holds its own files only, none of the other run's (ema.pt, rank-00001.pt, deepspeed/)."""
    ckpt = tmp_path / "run" / "checkpoints"
    stale = ckpt / "step-000005"
    (stale / "deepspeed" / "state").mkdir(parents=True)
    for name in ("ema.pt", "rank-00001.pt", "deepspeed/state/mp_rank_00_model_states.pt", "model.pt"):
        torch.save({"other": torch.zeros(2)}, stale / name)
    run_train(tiny(digits_shards, tmp_path / "run", "train.steps=5", "train.checkpoint_every=5", "train.eval_every=0"))
    written = sorted(str(p.relative_to(stale)) for p in stale.rglob("*"))
    assert written == ["COMPLETE", "config.yaml", "meta.json", "model.pt", "optimizer.pt", "rank-00000.pt"], written


def test_a_checkpoint_of_another_model_config_is_one_line(digits_shards, finished_run, tmp_path):
    ckpt = finished_run / "checkpoints"
    proc = run_train(tiny(digits_shards, tmp_path / "other", "train.steps=20", "model.z_dim=16",
                          f"train.checkpoint_dir={ckpt}"), check=False)
    line = one_error(proc)
    assert line == (f"error: checkpoint {ckpt}/step-000010 was trained with another model config (model.z_dim: 8 "
                    "there, 16 here); resume with the same model.* values, or start a new run with "
                    "train.resume=never and another train.checkpoint_dir"), line


def test_resume_from_a_url_elsewhere_unpickles_only_with_the_flag(digits_shards, finished_run, tmp_path):
    """train.resume=<URL> outside this run's checkpoint directory: its .pt files are pickles, refused in one
    line before any is opened (the payload would touch a file); with train.allow_pickle=true a real one resumes."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "elsewhere" / "step-000010"
    evil.mkdir(parents=True)
    for name in ("model.pt", "optimizer.pt", "rank-00000.pt"):
        torch.save(Payload(), evil / name)
    (evil / "meta.json").write_text(json.dumps({"step": 10, "world_size": 1}))
    (evil / "COMPLETE").write_bytes(b"")
    proc = run_train(tiny(digits_shards, tmp_path / "run", "train.steps=12", f"train.resume={evil}"), check=False)
    line = one_error(proc)
    assert line == (f"error: train.resume={evil} is a checkpoint outside this run's checkpoint directory "
                    f"({tmp_path / 'run' / 'checkpoints'}): its .pt files are pickles, and unpickling one runs any "
                    "code it names. Set train.allow_pickle=true to resume from a checkpoint you trust, or copy it "
                    "into train.checkpoint_dir and use train.resume=auto"), line
    assert not marker.exists()

    good = finished_run / "checkpoints" / "step-000010"
    proc = run_train(tiny(digits_shards, tmp_path / "run", "train.steps=12", f"train.resume={good}",
                          "train.allow_pickle=true"))
    assert f"resumed from {good} at step 10" in proc.stdout
    assert (tmp_path / "run" / "checkpoints" / "step-000012" / "COMPLETE").exists()


@pytest.mark.slow
def test_resume_drops_the_dead_timeline_and_tests_the_live_best(digits_shards, tmp_path):
    """Killed (kill -9) after a best-N beyond its last step checkpoint S; resumed with train.steps=S+1, the
    dead best-N (N > S+1) is removed and the teardown tests the live timeline's best, not the higher-numbered
    dead one that the newest best-* would be."""
    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    args = ["train.steps=80", "train.checkpoint_every=20", "train.eval_every=5"]
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), *tiny(digits_shards, out, *args)]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300

    def dead_best() -> bool:
        return any(p.name.startswith("best-") and int(p.name[5:]) > 20 and int(p.name[5:]) % 20
                   and (p / "COMPLETE").exists() for p in ckpt.glob("best-*"))

    while not dead_best():
        assert proc.poll() is None, "the run ended before a best-N beyond a step checkpoint was written"
        assert time.time() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = CheckpointStore(str(ckpt))
    last_step = store.complete("step")[-1][0]
    dead = [name for s, name in store.complete("best") if s > last_step + 1]
    assert dead, "killed too late to test anything"

    resumed = run_train(tiny(digits_shards, out, *args[1:], f"train.steps={last_step + 1}"))
    assert f"removed the abandoned timeline after step {last_step}: " in resumed.stdout
    assert all(not (ckpt / name).exists() for name in dead)
    metrics = finite_metrics(out, 1)
    assert metrics["best_step"] <= last_step + 1
    assert metrics["tested_checkpoint"] == f"best-{metrics['best_step']:06d}"
    run_id = json.loads((ckpt / f"step-{last_step + 1:06d}" / "meta.json").read_text())["run_id"]
    assert json.loads((ckpt / metrics["tested_checkpoint"] / "meta.json").read_text())["run_id"] == run_id


# ----------------------------------------------------------------------------- elastic resume


ELASTIC = ["train.steps=14", "train.checkpoint_every=1", "train.keep_last=4", "train.eval_every=0", "train.log_every=1"]


def _elastic(digits_shards, tmp_path, before: int, after: int) -> tuple[Path, subprocess.CompletedProcess, list]:
    """`before` processes train to step 10, `after` processes resume from there to step 14; the banks saved
    at step 10 by each old rank."""
    out = tmp_path / "run"
    run_train(tiny(digits_shards, out, "train.steps=10", "train.checkpoint_every=10"), nproc=before)
    saved = [bank(out / "checkpoints", "step-000010", r) for r in range(before)]
    proc = run_train(tiny(digits_shards, out, *ELASTIC), nproc=after)
    return out, proc, saved


def _check_pooled(ckpt: Path, saved: list, after: int) -> None:
    """After one step on the new ranks, each bank still holds its pooled share: only the 64 chains that step
    drew (sampler.num_chains = data.batch_unlabelled) have moved."""
    for rank in range(after):
        share = pool_chains(saved, rank, after)[:500]
        now = bank(ckpt, "step-000011", rank)
        assert now.shape == (500, 8)
        same = (now[:len(share)] == share).all(dim=1).sum().item()
        assert same >= len(share) - 64, (rank, same, len(share))


def test_grad_accum_changed_with_the_process_count_keeps_the_data_position(digits_shards, tmp_path):
    """The usual elastic requeue: 2 processes at train.grad_accum=1 to update 3, then 1 process at grad_accum=2
    (the same examples per update) to update 6. The old ranks read 3 batches each, so the resumed process reads
    the 1-process stream from batch 6 on: every micro-batch it draws is the one that stream holds there, none
    skipped, none replayed (before, the new grad_accum moved it to batch 12)."""
    sys.path.insert(0, str(REPO / "tests" / "scripts"))
    from train_recording_batches import batch_digest

    from ssl_ebm import data

    out, seen = tmp_path / "run", tmp_path / "seen"
    common = ["train.checkpoint_every=3", "train.eval_every=0", "train.log_with=none"]
    script = REPO / "tests" / "scripts" / "train_recording_batches.py"
    run_train([str(seen / "before"), *tiny(digits_shards, out, *common, "train.steps=3")], nproc=2, script=script)
    run_train([str(seen / "after"), *tiny(digits_shards, out, *common, "train.steps=6", "train.grad_accum=2")],
              script=script)

    def stream(world: int, rank: int, n: int) -> list[str]:
        batches = data.train_batches(digits_shards, batch_unlabelled=64, batch_labelled=16, seed=0, rank=rank,
                                     world_size=world)
        return [batch_digest(next(batches)) for _ in range(n)]

    for rank in range(2):
        assert (seen / "before" / f"rank-{rank}.txt").read_text().split() == stream(2, rank, 3)
    assert (seen / "after" / "rank-0.txt").read_text().split() == stream(1, 0, 12)[6:]


@pytest.mark.slow
def test_two_processes_resume_on_one(digits_shards, tmp_path):
    out, proc, saved = _elastic(digits_shards, tmp_path, 2, 1)
    assert ("resumed step-000010 saved by 2 processes on 1: pooled 1000 chains -> 500 per rank (the first 500 of "
            "each rank's share of 1000), data position batch 20 of the 1-process stream") in proc.stdout
    assert "RNG reseeded" in proc.stdout
    _check_pooled(out / "checkpoints", saved, 1)
    finite_metrics(out, 1)


@pytest.mark.slow
def test_one_process_resumes_on_two(digits_shards, tmp_path):
    out, proc, saved = _elastic(digits_shards, tmp_path, 1, 2)
    assert ("resumed step-000010 saved by 1 process on 2: pooled 500 chains -> 250 per rank, filled to 500 "
            "from p0, data position batch 5 of the 2-process stream") in proc.stdout
    _check_pooled(out / "checkpoints", saved, 2)
    metrics = finite_metrics(out, 2)
    a, b = metrics["rank_param_checksums"]
    assert a == b, "ranks ended with different parameters"
