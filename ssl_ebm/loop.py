"""The training loop's parts besides Algorithm 1's step (launch/train.py): the run's shared context, and
the periodic actions the loop calls after each step, in this order:

    log_step                every train.log_every steps and at the last: losses, LR, health -> log.jsonl, TensorBoard
    save_images             every train.image_every steps (image data): inputs, reconstructions, prior samples
    evaluate_and_keep_best  every train.eval_every steps and at the last: validation (of the weights' average
                            under train.ema_decay), best-<step>, early stopping
    refresh_teacher         model.pseudo_label_weight: every model.pseudo_label_every steps from
                            model.pseudo_label_start on, the pseudo-labels' graph rebuilt from the weights
    checkpoint              every train.checkpoint_every steps, at the last and at an early stop: step-<step>
    preempt                 on a stop signal (SLURM): checkpoint, then Preempted (exit status 75: requeue me)

`stop_if_requested` does the same for a signal during start-up, before any step (nothing to save).

and `finish`, the teardown: the test split on the weights best on validation, metrics.json.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from ssl_ebm import config as C
from ssl_ebm import data, health, logs, runtime
from ssl_ebm.checkpoint import CheckpointStore
from ssl_ebm.graph import GraphMemory, encode
from ssl_ebm.langevin_graph import CapturedLangevin
from ssl_ebm.metrics import evaluate
from ssl_ebm.resume import best_checkpoint
from ssl_ebm.state import TrainingState


class Preempted(Exception):
    """Raised after the preemption checkpoint is written (or, during start-up, with nothing to write)."""


@dataclass
class Run:
    """What the step and the periodic actions share besides the training state."""

    cfg: C.Config
    state: TrainingState
    store: CheckpointStore
    url: str  # the shards
    out_dir: str
    monitor: health.Monitor
    watchdog: health.Watchdog
    jsonl: logs.JsonlLog | None  # main process only
    sampler: CapturedLangevin | None  # None for the supervised baseline
    memory_format: torch.memory_format
    progress: object = None  # a tqdm bar on the main process
    preemption: runtime.Preemption = field(default_factory=runtime.Preemption)
    t_log: float = field(default_factory=time.time)
    n_log: int = 0

    @property
    def ebm(self) -> bool:
        return self.cfg.train.method == "ebm"


def due(every: int, done: int, *also: int | None) -> bool:
    """Whether step `done` is a multiple of `every` (0 = never) or one of `also`."""
    return (every > 0 and done % every == 0) or done in also


def log_step(run: Run, done: int, terms: dict, z_neg) -> None:
    acc = run.state.acc
    record = {k: float(v.detach()) for k, v in terms.items()}
    record.update(step=done, lr_prior=run.state.scheduler.get_last_lr()[-1], nan_skips=run.state.counters["nan_skips"],
                  steps_per_s=run.n_log / max(time.time() - run.t_log, 1e-9))
    run.t_log, run.n_log = time.time(), 0
    acc.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=done)
    health_record = run.monitor.record(terms, z_neg)
    acc.log({f"health/{k}": v for k, v in health_record.items()}, step=done)
    record.update(health_record)
    if run.jsonl is not None:
        run.jsonl.write(record)
        run.jsonl.flush()
    if run.progress is not None:
        run.progress.set_postfix(loss=f"{record['loss']:.3g}", ce=f"{record.get('ce', 0):.3g}")


def save_images(run: Run, done: int, batch: dict, z_neg) -> None:
    """Inputs, reconstructions and prior samples. Every rank runs the nets (under ZeRO-3 that gathers
    parameters, a collective); rank 0 writes."""
    acc, net = run.state.acc, run.state.net
    with torch.no_grad(), runtime.full_params(acc, net):
        x = batch["x_u"][:64] if run.ebm and len(batch["x_u"]) else batch["x_l"][:64]
        net.eval()
        recon = net.generator(net.encoder(x)[0]).float()
        net.train()
        grids = {"inputs": x, "reconstructions": recon}
        if z_neg is not None:
            grids["prior_samples"] = net.generator(z_neg[:64]).float()
        for kind, imgs in grids.items():
            if acc.is_main_process:
                logs.save_png(f"{run.out_dir}/images/{kind}-{done:06d}.png", logs.image_grid(imgs))


def run_eval(run: Run, split: str, averaged: bool = True) -> dict:
    """Accuracy on `split`; with train.ema_decay, of the averaged weights unless `averaged` is False (the
    weights in the model as they are: the teardown's, loaded from a best-* that already holds the average)."""
    acc, net, cfg = run.state.acc, run.state.net, run.cfg
    net.eval()
    batches = lambda: data.eval_batches(run.url, split, batch_size=cfg.data.eval_batch,  # noqa: E731
                                        rank=acc.process_index, world_size=acc.num_processes,
                                        num_workers=cfg.data.workers)
    weights = run.state.averaged() if averaged else contextlib.nullcontext()
    with weights, acc.autocast(), runtime.full_params(acc, net):
        out = evaluate(net.predict_logits, batches(), cfg.model.num_classes, acc.device)
        if run.ebm and cfg.model.graph_smoothing > 0:  # the smoothed prediction is the score; f(mu) alone beside it
            memory = GraphMemory.from_shards(net, run.url, cfg, acc.device, num_workers=cfg.data.workers)
            prior_accuracy = out.get("accuracy")
            out = evaluate(lambda x: memory.proba(*encode(net, x)).log(), batches(), cfg.model.num_classes,
                           acc.device)
            out["prior_accuracy"] = prior_accuracy
    net.train()
    return out


def evaluate_and_keep_best(run: Run, done: int) -> None:
    """Validation; a new best is saved as best-<step>; early stopping counts passes without one."""
    val, counters = health.val_record(run_eval(run, "val")), run.state.counters
    if run.state.ema is not None:  # the trained weights beside the average, for the log
        val["val_accuracy_trained"] = run_eval(run, "val", averaged=False)["accuracy"]
    run.state.acc.log({f"val/{k.removeprefix('val_')}": v for k, v in val.items()}, step=done)
    if run.jsonl is not None:
        run.jsonl.write({"step": done, **val})
        run.jsonl.flush()
    improved = val["val_accuracy"] > counters["best_val"]
    if improved:
        counters.update(best_val=val["val_accuracy"], best_step=done)
        with run.state.averaged():  # best-* holds the weights just validated
            run.state.save(run.store, "best", done)
    if health.early_stop(run.cfg.health, counters, improved):  # model selection on validation only
        counters["stopped_at"] = done


def teacher_due(run: Run, done: int) -> bool:
    """Whether update `done` rebuilds the pseudo-labels' graph (model.pseudo_label_weight)."""
    mc = run.cfg.model
    return (run.ebm and mc.pseudo_label_weight > 0 and done >= mc.pseudo_label_start
            and due(mc.pseudo_label_every, done - mc.pseudo_label_start))


def refresh_teacher(run: Run) -> None:
    """The graph of model.graph_smoothing built from the weights as they are (every rank builds the same one,
    from the same shards, as validation does); the next updates read their pseudo-labels from it, and the
    checkpoints keep it (graph.pt), so a resumed run reads the same ones."""
    acc, net, cfg = run.state.acc, run.state.net, run.cfg
    net.eval()
    with torch.no_grad(), acc.autocast(), runtime.full_params(acc, net):
        run.state.teacher = GraphMemory.from_shards(net, run.url, cfg, acc.device, num_workers=cfg.data.workers)
    net.train()


def checkpoint(run: Run, done: int) -> None:
    run.state.save(run.store, "step", done, **run.monitor.checkpoint_health())


def stop_if_requested(acc, preemption: runtime.Preemption, where: str) -> None:
    """A stop signal that came during start-up, before the first step: every rank agrees (one small gather)
    and the run ends with the requeue status having written nothing; the requeued job starts again from the
    checkpoint this one resumed (or from scratch). Called between the steps of start-up that must not be cut."""
    stop = runtime.gather(acc, torch.tensor([float(preemption.requested)], device=acc.device))
    if bool(stop.any()):
        acc.print(f"stop signal received during start-up ({where}): no step taken, nothing written; exiting "
                  f"with status {runtime.Preemption.EXIT_CODE} so the job is requeued", flush=True)
        raise Preempted()


def preempt(run: Run, done: int) -> None:
    """Told to stop: save where we are (unless just saved) and exit with the status that asks for a requeue."""
    if not due(run.cfg.train.checkpoint_every, done):
        checkpoint(run, done)
    acc = run.state.acc
    acc.print(f"stop signal received: checkpoint at step {done} written to {run.store.url}; exiting "
              f"with status {runtime.Preemption.EXIT_CODE} so the job is requeued")
    acc.end_training()  # flush the trackers
    raise Preempted()


def finish(run: Run, manifest: dict, t_start: float, paused_at: int | None = None) -> dict:
    """Teardown: test the weights that were best on validation (never chosen on test), or with
    train.select=final the weights at the end (averaged with train.ema_decay); metrics.json.
    paused_at: the update where train.stop_after paused the run (recorded; resume=auto continues it)."""
    cfg, acc, net, counters = run.cfg, run.state.acc, run.state.net, run.state.counters
    with runtime.full_params(acc, net):  # a cheap check that every rank ends with the same weights
        checksum = torch.stack([p.detach().double().sum() for p in net.parameters()]).sum().reshape(1)
    checksums = runtime.gather(acc, checksum.to(acc.device)).tolist()
    final = cfg.train.select == "final"
    best = None if final else best_checkpoint(run.state, run.store)  # this run's, of the live timeline
    if best is not None:
        with runtime.full_params(acc, net, modify=True):  # ZeRO-3: load into the gathered parameters
            net.load_state_dict(run.store.read_torch(best, "model.pt"))
    results = {"dataset": manifest.get("dataset", ""), "method": cfg.train.method, "steps": cfg.train.steps,
               "select": cfg.train.select, "best_step": None if final else counters["best_step"],
               "val_accuracy": None if final else counters["best_val"],
               "nan_skips": counters["nan_skips"], "recoveries": counters.get("recoveries", 0),
               "stopped_at": counters.get("stopped_at"), "tested_checkpoint": best,
               **({"paused_at": paused_at} if paused_at else {}),
               "seconds": round(time.time() - t_start, 1), "processes": acc.num_processes,
               "rank_param_checksums": checksums}
    if manifest["splits"].get("test", {}).get("count", 0):
        results["test"] = run_eval(run, "test", averaged=best is None)  # best-* holds the average already
    if acc.is_main_process:
        logs.write_json(f"{run.out_dir}/metrics.json", results)
        test_acc = results.get("test", {}).get("accuracy", float("nan"))
        chosen = "final weights" if final else \
            f"best val {counters['best_val']:.4f} at step {counters['best_step']}"
        print(f"{results['dataset']} {cfg.train.method}: test accuracy {test_acc:.4f} ({chosen}), "
              f"{f'paused at step {paused_at} of ' if paused_at else ''}{cfg.train.steps} steps in "
              f"{results['seconds']:.0f} s on {acc.num_processes} process(es); results in "
              f"{run.out_dir}/metrics.json", flush=True)
    acc.wait_for_everyone()  # no rank tears the process group down while another still uses it
    acc.end_training()
    return results
