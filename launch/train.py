"""Train the latent-EBM semi-supervised model: Algorithm 1 of Pang et al., one optimizer update per step.

    accelerate launch launch/train.py --config configs/cifar10.yaml [section.key=value ...]
    python launch/train.py --config configs/digits.yaml train.steps=200

Reads top to bottom: config, runtime, data, training state (model, chains, optimizer, schedule), resume,
the loop (`train_step`, then the periodic actions in order), teardown. A step is one update from
`train.grad_accum` micro-batches; the schedule, logs, evaluation, checkpoints and stops all count updates.
"""

from __future__ import annotations

import signal

if __name__ == "__main__":  # SLURM's stop signals wait, held, while the imports below run (seconds), until
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGUSR1))  # main() installs its handlers

import argparse
import sys
import time
from dataclasses import replace

import torch

from shards import make
from ssl_ebm import config as C
from ssl_ebm import data, health, logs, runtime
from ssl_ebm.checkpoint import CheckpointError, CheckpointStore
from ssl_ebm.health import TrainingError
from ssl_ebm.langevin import sample_negatives
from ssl_ebm.langevin_graph import CapturedLangevin
from ssl_ebm.likelihood import categorical_blocks
from ssl_ebm.loop import (Preempted, Run, checkpoint, due, evaluate_and_keep_best, finish, log_step, preempt,
                          refresh_teacher, save_images, stop_if_requested, teacher_due)
from ssl_ebm.resume import start_or_resume
from ssl_ebm.state import TrainingState


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 model.z_dim=16")
    return p.parse_args(argv)


def fill_from_manifest(cfg: C.Config, raw: dict, manifest: dict) -> C.Config:
    """Take the data's shape and class count from the manifest unless the config states them."""
    stated = raw.get("model", {})
    fields = {"x_shape": tuple(manifest["x_shape"]), "num_classes": int(manifest["num_classes"])}
    if cfg.model.likelihood == "mixed":  # a table's one-hot blocks: categorical under the mixed likelihood
        fields["categorical_blocks"] = categorical_blocks(manifest)
    for key, value in fields.items():
        if key in stated and getattr(cfg.model, key) != value:
            raise C.ConfigError(f"model.{key}: config says {getattr(cfg.model, key)} but the shards at "
                                f"{cfg.data.shards} hold {value}; remove model.{key} to take it from the data")
    return replace(cfg, model=replace(cfg.model, **fields))


def train_step(run: Run, batches: list[dict], done: int) -> tuple[dict, torch.Tensor | None, bool]:
    """Algorithm 1, one optimizer update from the `train.grad_accum` micro-batches of `batches`.

    Each micro-batch: its own negatives, forward, the cross-rank status check, then backward (Accelerate
    divides each loss by grad_accum, so the update follows the window's mean gradient; DDP all-reduces on
    the last micro-batch only). A failed check stops the window before that micro-batch's backward: the
    divergence / NaN handling clears what the window accumulated, and no update is applied. Returns the
    loss terms (means over the micro-batches run), the last z-, and whether any rank was told to stop."""
    acc, seen, stop = run.state.acc, [], False
    for i, batch in enumerate(batches):
        # Accelerate's own micro-step counter is in no checkpoint and runs on across a roll-back; set it so
        # that the sync (all-reduce, and DeepSpeed's step inside backward) falls on the window's last micro-batch.
        acc.step = i
        with acc.accumulate(run.state.model):
            terms, z_neg, status = forward(run, batch)
            seen.append({k: v.detach() for k, v in terms.items()})
            stop = stop or bool(status[:, 1].any())
            if not (bool(status[:, 0].all()) and bool(status[:, 2:].all())):
                no_update(run, status, terms, done)
                return window_mean(seen), z_neg, stop
            acc.backward(terms["loss"])
    update(run, done)
    return window_mean(seen), z_neg, stop


def forward(run: Run, batch: dict) -> tuple[dict, torch.Tensor | None, torch.Tensor]:
    """Negatives (step 2) and forward (steps 3-6) of one micro-batch, and the status every rank agrees on."""
    cfg, state, acc = run.cfg, run.state, run.state.acc
    net, z_neg = state.net, None
    if run.ebm:  # step 2: update persistent chains, then pool the negatives of all ranks
        with runtime.full_params(acc, net.prior):
            num_chains = cfg.sampler.num_chains or cfg.data.batch_unlabelled
            z_neg_local = sample_negatives(net.prior, state.bank, num_chains, cfg.sampler, cfg.model.sigma0,
                                           device=acc.device, stats=run.monitor.sampler_stats, sampler=run.sampler)
        z_neg = runtime.gather(acc, z_neg_local)
    teacher = state.teacher.proba if state.teacher is not None else None  # model.pseudo_label_weight's graph
    terms = state.model(batch["x_u"] if run.ebm else None, batch["x_l"], batch["y_l"], z_neg, teacher=teacher)
    # One small gather per micro-batch, before backward so that every rank takes the same branch (and
    # DeepSpeed, which steps inside backward, never applies a non-finite update): is the loss finite
    # everywhere, has any rank been told to stop, are the watchdog's health checks passed?
    status = runtime.gather(acc, run.monitor.status(terms, run.preemption.requested))
    return terms, z_neg, status.view(acc.num_processes, -1).cpu()  # (ranks, [finite, stop, *health.CHECKS])


def window_mean(seen: list[dict]) -> dict:
    """The loss terms averaged over the micro-batches of one update (for the log)."""
    return {k: torch.stack([t[k] for t in seen]).mean(0) for k in seen[0]}


def update(run: Run, done: int) -> None:
    """The update at the window's end: gradient metrics, clipping, optimizer, one schedule step, the average."""
    cfg, state, acc = run.cfg, run.state, run.state.acc
    assert acc.sync_gradients, "the update must fall on the window's last micro-batch"
    if run.monitor.due(done):
        run.monitor.measure_grads(state.net)
    if cfg.optim.grad_clip > 0:
        acc.clip_grad_norm_(state.model.parameters(), cfg.optim.grad_clip)
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    if state.ema is not None:
        state.ema.update(state.net)


def no_update(run: Run, status: torch.Tensor, terms: dict, done: int) -> None:
    """A failed check: back to the last good checkpoint with the remedy, stop, or skip and count."""
    cfg, counters = run.cfg, run.state.counters
    if cfg.health.watchdog:
        run.watchdog.recover(done, status, terms, run.state)
    elif cfg.train.on_nan == "stop":
        raise TrainingError(f"non-finite loss ({terms['loss'].item()} on rank {run.state.acc.process_index}) at "
                            f"step {done}; lower the learning rates, enable optim.grad_clip, or set train.on_nan=skip")
    else:
        runtime.clear_grads(run.state.acc, run.state.model)  # what the window accumulated is not applied
        run.state.set_schedule_position(done)  # the skipped update counts, as the watchdog's do
        counters["nan_skips"] += 1
        if counters["nan_skips"] > cfg.train.max_nan_skips:
            raise TrainingError(f"{counters['nan_skips']} non-finite losses by step {done} "
                                f"(train.max_nan_skips={cfg.train.max_nan_skips}); the run has diverged")


# ----------------------------------------------------------------------------- the run


def train(cfg: C.Config, raw: dict, before_step=None, preemption: runtime.Preemption | None = None) -> dict:
    """`before_step(done, state)` runs before every step (tests inject faults); `preemption`: main's handlers."""
    t_start = time.time()
    preemption = preemption or runtime.Preemption()
    if cfg.train.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(cfg.train.cpu_threads)
    out_dir = cfg.train.out_dir.rstrip("/")
    acc = runtime.make_accelerator(cfg, logging_dir=logs.tensorboard_dir(out_dir))
    store = CheckpointStore(cfg.train.checkpoint_dir or f"{out_dir}/checkpoints")
    store.check_writable()  # fail now, not after hours of training
    with acc.main_process_first():  # build the shards on first use (main process first, the others then read)
        url = make.ensure(cfg.data)
    stop_if_requested(acc, preemption, "after the shards")
    manifest = data.read_manifest(url)
    cfg = fill_from_manifest(replace(cfg, data=replace(cfg.data, shards=url)), raw, manifest)

    image_data = len(cfg.model.x_shape) == 3
    fmt = torch.channels_last if acc.device.type == "cuda" and image_data and cfg.train.channels_last \
        else torch.contiguous_format
    state = TrainingState.create(cfg, acc, memory_format=fmt)  # identical initial weights on every rank
    start_or_resume(state, store, cfg.train.resume)  # a new run id, or resume (its own checkpoints, live timeline)
    stop_if_requested(acc, preemption, "after resuming" if state.counters["step"] else "before the first step")
    if acc.is_main_process:  # after the checks above: a refused run overwrites nothing
        logs.write_text(f"{out_dir}/config.yaml", C.dump_config(cfg))
    start = state.counters["step"]
    jsonl = logs.JsonlLog(f"{out_dir}/log.jsonl") if acc.is_main_process else None
    if jsonl is not None:
        jsonl.truncate_after(start)
    acc.init_trackers("ssl_ebm", config={"method": cfg.train.method, "dataset": manifest.get("dataset", "")})
    monitor = health.Monitor(cfg)
    run = Run(cfg, state, store, url, out_dir, monitor, health.Watchdog(cfg, acc, store, jsonl), jsonl,
              CapturedLangevin(state.net.prior, enabled=cfg.sampler.cuda_graph) if cfg.train.method == "ebm" else None,
              fmt, progress_bar(acc, cfg, start), preemption)
    if cfg.health.watchdog and start == 0:  # somewhere for the watchdog to go back to before the first checkpoint
        state.save(store, "step", 0)
    # start_step counts micro-batches (TrainingState.batches_read). The batches reach the device one step
    # ahead: copied, and images made float, while a step runs.
    stream = data.DeviceBatches(data.train_batches(
        url, batch_unlabelled=cfg.data.batch_unlabelled if run.ebm else 0, batch_labelled=cfg.data.batch_labelled,
        seed=cfg.train.seed, rank=acc.process_index, world_size=acc.num_processes,
        num_workers=cfg.data.workers, shuffle_buffer=cfg.data.shuffle_buffer, cache_mb=cfg.data.cache_mb,
        start_step=state.batches_read(start), uint8_images=True),
        acc.device, fmt)
    # train.select=final: the validation split is never opened (no passes, no best-*, no early stopping)
    val_split = cfg.train.select == "val" and bool(manifest["splits"].get("val", {}).get("count", 0))
    t, end = cfg.train, state.counters.get("stopped_at") or cfg.train.steps  # an early-stopped run stays stopped
    pause = t.stop_after if 0 < t.stop_after < end else None  # validated and checkpointed there, then finish()
    end, done = pause or end, start

    for step in range(start, end):
        done = step + 1
        if before_step is not None:
            before_step(done, state)
        batches = [next(stream) for _ in range(cfg.train.grad_accum)]
        terms, z_neg, stop_requested = train_step(run, batches, done)
        run.n_log += 1
        if run.progress is not None:
            run.progress.update(1)
        if t.log_every and due(t.log_every, done, t.steps):
            log_step(run, done, terms, z_neg)
        if image_data and due(t.image_every, done):
            save_images(run, done, batches[-1], z_neg)
        if val_split and due(t.eval_every, done, t.steps, pause):
            evaluate_and_keep_best(run, done)
        if teacher_due(run, done):
            refresh_teacher(run)
        if due(t.checkpoint_every, done, t.steps, state.counters.get("stopped_at"), pause):
            checkpoint(run, done)
        if stop_requested:
            preempt(run, done)
        if state.counters.get("stopped_at") == done:
            acc.print(f"early stop at step {done}: no better validation accuracy in {cfg.health.patience} "
                      f"passes (health.patience); best {state.counters['best_val']:.4f} at step "
                      f"{state.counters['best_step']}")
            break
    if run.progress is not None:
        run.progress.close()
    paused = pause is not None and done == pause and state.counters.get("stopped_at") != done
    return finish(run, manifest, t_start, paused_at=pause if paused else None)


def progress_bar(acc, cfg: C.Config, start: int):
    if not (acc.is_main_process and cfg.train.progress):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.train.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)


def main(argv=None, before_step=None) -> int:
    preemption = runtime.Preemption()  # first: a stop signal during start-up is remembered, not fatal
    args = parse_args(argv)
    try:
        raw = C.raw_tree(args.config, args.overrides)
        cfg = C.from_dict(C.Config, raw)
        train(cfg, raw, before_step, preemption)
    except (C.ConfigError, data.DataError, CheckpointError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except Preempted:
        return runtime.Preemption.EXIT_CODE
    finally:
        runtime.shutdown()  # every exit path, the requeue status included
    return 0


if __name__ == "__main__":
    runtime.exit_process(main())
