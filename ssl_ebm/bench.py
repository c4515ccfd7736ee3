"""Speed of one Algorithm-1 step, reported as JSON.

    python -m ssl_ebm.bench --config configs/cifar10.yaml [section.key=value ...] [--steps 50]

Measures, in one run: the full step as the training loop runs it (Langevin on the persistent chains,
forward, the per-step health check, backward, Adam) with the batch already on the device, with the
captured sampler (a CUDA graph on GPU; its static-buffer program run eagerly on CPU) and with the
eager one side by side; the sampler's share of the step; end to end with the real shard loader (the config's
shards must exist: `python -m shards.make`, or one training run, builds them); and peak memory. Runs on CPU too (use a small config).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from ssl_ebm import config as C
from ssl_ebm import data, health
from ssl_ebm.langevin import ChainBank, sample_negatives
from ssl_ebm.langevin_graph import CapturedLangevin
from ssl_ebm.model import LatentEBM


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Mean seconds per call of `fn` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run(cfg: C.Config, steps: int = 20, warmup: int = 5, end_to_end: bool = True) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.train.cpu_threads and device.type == "cpu":  # as the training loop does
        torch.set_num_threads(cfg.train.cpu_threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    url = None
    if end_to_end and (cfg.data.shards or cfg.data.dataset):
        url = cfg.data.shards  # built by `python -m shards.make` or a first training run
        manifest = data.read_manifest(url)
        cfg.model.x_shape, cfg.model.num_classes = tuple(manifest["x_shape"]), int(manifest["num_classes"])
    m, s = cfg.model, cfg.sampler
    bu, bl = cfg.data.batch_unlabelled, cfg.data.batch_labelled
    image = len(m.x_shape) == 3
    fmt = torch.channels_last if image and device.type == "cuda" and cfg.train.channels_last else torch.contiguous_format

    torch.manual_seed(cfg.train.seed)
    model = LatentEBM(m).to(device, memory_format=fmt)
    optimizer = torch.optim.Adam(model.param_groups(cfg.optim), betas=cfg.optim.betas,
                                 fused=device.type == "cuda")
    bank = ChainBank(s.bank_size, m.z_dim, m.sigma0, device=device, seed=cfg.train.seed)
    x_u = torch.randn(bu, *m.x_shape, device=device).tanh()
    x_l = torch.randn(bl, *m.x_shape, device=device).tanh()
    if m.likelihood == "multinomial":
        x_u, x_l = x_u.abs().round(), x_l.abs().round()
    if image:
        x_u, x_l = x_u.contiguous(memory_format=fmt), x_l.contiguous(memory_format=fmt)
    y_l = torch.randint(0, m.num_classes, (bl,), device=device)
    n = s.num_chains or bu
    captured = CapturedLangevin(model.prior, enabled=s.cuda_graph)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.train.mixed_precision == "bf16")

    def negatives(sampler):  # Algorithm 1 step 2 as the training loop runs it (sampler None: eager)
        return sample_negatives(model.prior, bank, n, s, m.sigma0, sampler=sampler)

    monitor = health.Monitor(cfg)

    def step(sampler, xu=x_u, xl=x_l, yl=y_l):
        z_neg = negatives(sampler)
        with torch.autocast(**amp):
            terms = model(xu, xl, yl, z_neg)
        # The training loop's one host sync per step: finite loss and health bounds, before backward.
        monitor.status(terms, False).cpu()
        terms["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "batch": {"unlabelled": bu, "labelled": bl, "chains": n}, "langevin_steps": s.steps,
           "mixed_precision": cfg.train.mixed_precision, "channels_last": fmt is torch.channels_last,
           "cuda_graph": s.cuda_graph}
    t_step = _timed(lambda: step(captured), steps, warmup, device)
    t_sampler = _timed(lambda: negatives(captured), steps, warmup, device)
    t_step_eager = _timed(lambda: step(None), steps, warmup, device)
    t_sampler_eager = _timed(lambda: negatives(None), steps, warmup, device)
    out.update(sampler_backend=captured.backend, graph_captures=captured.captures)
    out.update(step_ms=1e3 * t_step, samples_per_s=(bu + bl) / t_step, sampler_ms=1e3 * t_sampler,
               sampler_share=t_sampler / t_step, eager_step_ms=1e3 * t_step_eager,
               eager_sampler_ms=1e3 * t_sampler_eager, eager_over_captured_step=t_step_eager / t_step)
    if url is not None:
        stream = data.train_batches(url, batch_unlabelled=bu, batch_labelled=bl, seed=cfg.train.seed,
                                    num_workers=cfg.data.workers, shuffle_buffer=cfg.data.shuffle_buffer,
                                    cache_mb=cfg.data.cache_mb)

        def loaded_step():
            b = next(stream)
            step(captured, *(b[k].to(device, non_blocking=True, memory_format=fmt) if b[k].dim() == 4
                             else b[k].to(device, non_blocking=True) for k in ("x_u", "x_l", "y_l")))

        t_e2e = _timed(loaded_step, steps, warmup, device)
        out.update(end_to_end_step_ms=1e3 * t_e2e, end_to_end_samples_per_s=(bu + bl) / t_e2e,
                   loader_workers=cfg.data.workers)
    out["peak_memory_mb"] = _peak_memory_mb(device)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-end-to-end", action="store_true", help="skip the run with the real shard loader")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        cfg = C.load_config(args.config, args.overrides)
        result = run(cfg, args.steps, args.warmup, not args.no_end_to_end)
    except (C.ConfigError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
