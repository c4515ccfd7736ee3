"""Train the latent-EBM semi-supervised model: Algorithm 1 of Pang et al., one update per step.

    accelerate launch launch/train.py --config configs/cifar10.yaml [section.key=value ...]
    python launch/train.py --config configs/digits.yaml train.steps=200

Reads top to bottom: config, runtime, data, model, optimizer, prepare, resume, the loop, teardown.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import replace

import torch

from ssl_ebm import config as C
from ssl_ebm import data, health, logs, runtime
from ssl_ebm.checkpoint import CheckpointError, CheckpointStore, load_training_state, resolve_resume, save_training_state
from ssl_ebm.health import TrainingError
from ssl_ebm.langevin import ChainBank, sample_negatives
from ssl_ebm.langevin_graph import CapturedLangevin
from ssl_ebm.metrics import evaluate
from ssl_ebm.model import LatentEBM


class Preempted(Exception):
    """Raised after the preemption checkpoint is written."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 model.z_dim=16")
    return p.parse_args(argv)


def fill_from_manifest(cfg: C.Config, raw: dict, manifest: dict) -> C.Config:
    """Take the data's shape and class count from the manifest unless the config states them."""
    stated = raw.get("model", {})
    fields = {"x_shape": tuple(manifest["x_shape"]), "num_classes": int(manifest["num_classes"])}
    for key, value in fields.items():
        if key in stated and getattr(cfg.model, key) != value:
            raise C.ConfigError(f"model.{key}: config says {getattr(cfg.model, key)} but the shards at "
                                f"{cfg.data.shards} hold {value}; remove model.{key} to take it from the data")
    return replace(cfg, model=replace(cfg.model, **fields))


def lr_lambda(optim: C.OptimConfig, steps: int):
    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "cosine":
            t = (step - optim.warmup_steps) / max(1, steps - optim.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        return 1.0

    return factor


def tensorboard_dir(out_dir: str) -> str:
    """TensorBoard writes to local disk: the run directory when it is local, else a temporary one."""
    if "://" not in out_dir or out_dir.startswith("file://"):
        return os.path.join(out_dir.removeprefix("file://"), "tensorboard")
    return tempfile.mkdtemp(prefix="ssl_ebm_tb_")


def run_eval(acc, model, url: str, split: str, cfg: C.Config) -> dict:
    net = acc.unwrap_model(model)
    net.eval()
    batches = data.eval_batches(url, split, batch_size=cfg.data.eval_batch, rank=acc.process_index,
                                world_size=acc.num_processes, num_workers=cfg.data.workers)
    with acc.autocast(), runtime.full_params(acc, net):
        out = evaluate(net.predict_logits, batches, cfg.model.num_classes, acc.device)
    net.train()
    return out


def train(cfg: C.Config, raw: dict) -> dict:
    t_start = time.time()
    if cfg.train.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(cfg.train.cpu_threads)
    out_dir = cfg.train.out_dir.rstrip("/")
    acc = runtime.make_accelerator(cfg, logging_dir=tensorboard_dir(out_dir))
    store = CheckpointStore(cfg.train.checkpoint_dir or f"{out_dir}/checkpoints")
    store.check_writable()  # fail now, not after hours of training

    # ---- data: build the shards on first use (main process first, the others then read them)
    with acc.main_process_first():
        url = data.ensure_shards(cfg.data)
    manifest = data.read_manifest(url)
    cfg = fill_from_manifest(replace(cfg, data=replace(cfg.data, shards=url)), raw, manifest)
    splits = manifest["splits"]
    if acc.is_main_process:
        logs.write_text(f"{out_dir}/config.yaml", C.dump_config(cfg))

    # ---- model, chains, optimizer (identical initial weights on every rank)
    runtime.seed_everything(cfg.train.seed)
    model = LatentEBM(cfg.model)
    ebm = cfg.train.method == "ebm"
    num_chains = cfg.sampler.num_chains or cfg.data.batch_unlabelled
    bank = None
    if ebm and cfg.sampler.persistent:
        bank = ChainBank(cfg.sampler.bank_size, cfg.model.z_dim, cfg.model.sigma0, device=acc.device,
                         seed=cfg.train.seed * 100_003 + acc.process_index)
    cuda = acc.device.type == "cuda"
    image_data = len(cfg.model.x_shape) == 3
    memory_format = torch.channels_last if cuda and image_data and cfg.train.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.Adam(model.param_groups(cfg.optim), betas=cfg.optim.betas,
                                 weight_decay=cfg.optim.weight_decay,
                                 fused=cuda and not runtime.uses_deepspeed(acc))  # one kernel per group on GPU
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.train.steps))
    model, optimizer = acc.prepare(model, optimizer)
    runtime.seed_everything(cfg.train.seed * 7919 + acc.process_index + 1)  # per-rank noise

    # ---- resume
    meta = {"step": 0, "best_val": -1.0, "best_step": -1, "nan_skips": 0, "recoveries": 0}
    found = resolve_resume(store, cfg.train.resume)
    if found is not None:
        meta = load_training_state(*found, acc, model, optimizer, scheduler, bank)
        acc.print(f"resumed from {found[0].url_of(found[1])} at step {meta['step']}")
    start = meta["step"]
    jsonl = logs.JsonlLog(f"{out_dir}/log.jsonl") if acc.is_main_process else None
    if jsonl is not None:
        jsonl.truncate_after(start)
    acc.init_trackers("ssl_ebm", config={"method": cfg.train.method, "dataset": manifest.get("dataset", "")})
    monitor, watchdog = health.Monitor(cfg), health.Watchdog(cfg, acc, store, jsonl)
    if cfg.health.watchdog and start == 0:  # somewhere for the watchdog to go back to before the first checkpoint
        save_training_state(store, store.dir_name("step", 0), acc, model, optimizer, scheduler, bank, cfg, meta)

    stream = data.train_batches(
        url, batch_unlabelled=cfg.data.batch_unlabelled if ebm else 0, batch_labelled=cfg.data.batch_labelled,
        seed=cfg.train.seed, rank=acc.process_index, world_size=acc.num_processes,
        num_workers=cfg.data.workers, shuffle_buffer=cfg.data.shuffle_buffer, start_step=start)
    net = acc.unwrap_model(model)
    # Algorithm 1 step 2 as one replayed CUDA graph on GPU (eager on CPU and under ZeRO-3).
    sampler = CapturedLangevin(net.prior, enabled=cfg.sampler.cuda_graph) if ebm else None
    progress = None
    if acc.is_main_process and cfg.train.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.train.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    preemption = runtime.Preemption()
    t_log, n_log = time.time(), 0
    end = meta.get("stopped_at") or cfg.train.steps  # a resumed run that had stopped early stays stopped
    for step in range(start, end):
        health.inject_fault(cfg.health, step + 1, scheduler)  # tests only (health.fault_at_step)
        batch = {k: v.to(acc.device, non_blocking=True, memory_format=memory_format) if v.dim() == 4
                 else v.to(acc.device, non_blocking=True) for k, v in next(stream).items()}
        with acc.accumulate(model):
            z_neg = None
            if ebm:  # Algorithm 1 step 2: update persistent chains, then pool the negatives of all ranks
                with runtime.full_params(acc, net.prior):
                    z_neg_local = sample_negatives(net.prior, bank, num_chains, cfg.sampler, cfg.model.sigma0,
                                                   device=acc.device, stats=monitor.sampler_stats, sampler=sampler)
                z_neg = runtime.gather(acc, z_neg_local)
            terms = model(batch["x_u"] if ebm else None, batch["x_l"], batch["y_l"], z_neg)  # steps 3-6
            loss = terms["loss"]
            # One small gather per step, before backward so that every rank takes the same branch (and
            # DeepSpeed, which steps inside backward, never applies a non-finite update): is the loss
            # finite everywhere, has any rank been told to stop, are the watchdog's health checks passed?
            status = runtime.gather(acc, monitor.status(terms, preemption.requested)).view(acc.num_processes, -1)
            status = status.cpu()  # (ranks, [finite, stop, *health.CHECKS])
            finite, stop_requested = bool(status[:, 0].all()), bool(status[:, 1].any())
            healthy = bool(status[:, 2:].all())
            if finite and healthy:
                acc.backward(loss)
                if acc.sync_gradients and monitor.due(step + 1):
                    monitor.measure_grads(net)
                if acc.sync_gradients and cfg.optim.grad_clip > 0:
                    acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                if acc.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            elif cfg.health.watchdog:  # diverging: back to the last good checkpoint with the remedy, or give up
                watchdog.recover(step + 1, status, terms, model, optimizer, scheduler, bank, meta)
            elif cfg.train.on_nan == "stop":
                raise TrainingError(f"non-finite loss ({loss.item()} on rank {acc.process_index}) at step "
                                    f"{step + 1}; lower the learning rates, enable optim.grad_clip, or set "
                                    "train.on_nan=skip")
            else:  # skip this update and count it
                meta["nan_skips"] += 1
                if meta["nan_skips"] > cfg.train.max_nan_skips:
                    raise TrainingError(f"{meta['nan_skips']} non-finite losses by step {step + 1} "
                                        f"(train.max_nan_skips={cfg.train.max_nan_skips}); the run has diverged")
        done = step + 1
        n_log += 1
        if progress is not None:
            progress.update(1)

        if cfg.train.log_every and (done % cfg.train.log_every == 0 or done == cfg.train.steps):
            record = {k: float(v.detach()) for k, v in terms.items()}
            record.update(step=done, lr_prior=scheduler.get_last_lr()[-1], nan_skips=meta["nan_skips"],
                          steps_per_s=n_log / max(time.time() - t_log, 1e-9))
            t_log, n_log = time.time(), 0
            acc.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=done)
            health_record = monitor.record(terms, z_neg)
            acc.log({f"health/{k}": v for k, v in health_record.items()}, step=done)
            record.update(health_record)
            if jsonl is not None:
                jsonl.write(record)
                jsonl.flush()
            if progress is not None:
                progress.set_postfix(loss=f"{record['loss']:.3g}", ce=f"{record.get('ce', 0):.3g}")

        if image_data and cfg.train.image_every and done % cfg.train.image_every == 0:
            # Every rank runs the nets (under ZeRO-3 that gathers parameters, a collective); rank 0 writes.
            with torch.no_grad(), runtime.full_params(acc, net):
                x = batch["x_u"][:64] if ebm and len(batch["x_u"]) else batch["x_l"][:64]
                net.eval()
                recon = net.generator(net.encoder(x)[0]).float()
                net.train()
                grids = {"inputs": x, "reconstructions": recon}
                if z_neg is not None:
                    grids["prior_samples"] = net.generator(z_neg[:64]).float()
                for kind, imgs in grids.items():
                    if acc.is_main_process:
                        logs.save_png(f"{out_dir}/images/{kind}-{done:06d}.png", logs.image_grid(imgs))

        if splits.get("val", {}).get("count", 0) and (
                (cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == cfg.train.steps):
            val = health.val_record(run_eval(acc, model, url, "val", cfg))
            acc.log({f"val/{k.removeprefix('val_')}": v for k, v in val.items()}, step=done)
            if jsonl is not None:
                jsonl.write({"step": done, **val})
                jsonl.flush()
            improved = val["val_accuracy"] > meta["best_val"]
            if improved:
                meta.update(best_val=val["val_accuracy"], best_step=done)
                save_training_state(store, store.dir_name("best", done), acc, model, optimizer, scheduler, bank,
                                cfg, {**meta, "step": done})
            if health.early_stop(cfg.health, meta, improved):  # model selection on validation only
                meta["stopped_at"] = done

        if ((cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0)
                or done in (cfg.train.steps, meta.get("stopped_at"))):
            save_training_state(store, store.dir_name("step", done), acc, model, optimizer, scheduler, bank, cfg,
                            {**meta, "step": done, **monitor.checkpoint_health()})
        if stop_requested:  # preempted: save where we are and ask the scheduler to requeue us
            if not (cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0):
                save_training_state(store, store.dir_name("step", done), acc, model, optimizer, scheduler, bank,
                                    cfg, {**meta, "step": done, **monitor.checkpoint_health()})
            acc.print(f"stop signal received: checkpoint at step {done} written to {store.url}; exiting "
                      f"with status {runtime.Preemption.EXIT_CODE} so the job is requeued")
            acc.end_training()  # flush the trackers
            raise Preempted()
        if meta.get("stopped_at") == done:
            acc.print(f"early stop at step {done}: no better validation accuracy in {cfg.health.patience} passes "
                      f"(health.patience); best {meta['best_val']:.4f} at step {meta['best_step']}")
            break
    if progress is not None:
        progress.close()

    # ---- teardown: test the weights that were best on validation (never chosen on test)
    with runtime.full_params(acc, net):  # a cheap check that every rank ends with the same weights
        checksum = torch.stack([p.detach().double().sum() for p in net.parameters()]).sum().reshape(1)
    checksums = runtime.gather(acc, checksum.to(acc.device)).tolist()
    best = store.latest("best")
    if best is not None:
        with runtime.full_params(acc, net, modify=True):  # ZeRO-3: load into the gathered parameters
            net.load_state_dict(store.read_torch(best, "model.pt"))
    results = {"dataset": manifest.get("dataset", ""), "method": cfg.train.method, "steps": cfg.train.steps,
               "best_step": meta["best_step"], "val_accuracy": meta["best_val"], "nan_skips": meta["nan_skips"],
               "recoveries": meta.get("recoveries", 0), "stopped_at": meta.get("stopped_at"),
               "seconds": round(time.time() - t_start, 1), "processes": acc.num_processes,
               "rank_param_checksums": checksums}
    if splits.get("test", {}).get("count", 0):
        results["test"] = run_eval(acc, model, url, "test", cfg)
    if acc.is_main_process:
        logs.write_json(f"{out_dir}/metrics.json", results)
        test_acc = results.get("test", {}).get("accuracy", float("nan"))
        print(f"{results['dataset']} {cfg.train.method}: test accuracy {test_acc:.4f} "
              f"(best val {meta['best_val']:.4f} at step {meta['best_step']}), {cfg.train.steps} steps "
              f"in {results['seconds']:.0f} s on {acc.num_processes} process(es); results in {out_dir}/metrics.json",
              flush=True)
    acc.wait_for_everyone()  # no rank tears the process group down while another still uses it
    acc.end_training()
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        raw = C.raw_tree(args.config, args.overrides)
        cfg = C.from_dict(C.Config, raw)
        train(cfg, raw)
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
