"""Speed of one Algorithm-1 step: medians and spread over repeats, and a profiled breakdown, as JSON.

    python -m ssl_ebm.bench --config configs/cifar10.yaml [section.key=value ...]
        [--steps 200] [--repeats 3] [--warmup 20] [--profile-steps 10] [--no-eager] [--no-end-to-end]

Measures, in one run: the full step as the training loop runs it (Langevin on the persistent chains,
forward, the per-step health check, backward, Adam) with the batch already on the device, with the
captured sampler (a CUDA graph on GPU; its static-buffer program run eagerly on CPU) and with the
eager one side by side; the sampler's share of the step; end to end, fed by the training loop's own
input pipeline (the shard readers, then data.DeviceBatches: pinned uint8 images copied on a side
stream and converted on the device); and peak memory. Every figure is timed `--repeats` times over
`--steps` calls after `--warmup` calls, with the device synchronised around each repeat (never inside
it): the JSON gives the median, each repeat, and the spread (max - min) / median.

Then the PyTorch profiler records `--profile-steps` more steps (end to end when the shards exist) and
splits one step into parts by record_function ranges: waiting for data, the sampler, the forward of
encoder, generator and prior (and the loss terms around them), the health check, the backward of each
net (autograd's backward nodes carry the sequence number of the forward op that made them, so each
backward op is charged to the net whose forward made it), and the optimizer. The config's shards
must exist (`python -m shards.make`, or one training run, builds them). Runs on CPU too (small configs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from ssl_ebm import config as C
from ssl_ebm import data, health
from ssl_ebm.langevin import ChainBank, sample_negatives
from ssl_ebm.langevin_graph import CapturedLangevin
from ssl_ebm.model import LatentEBM

NETS = ("encoder", "generator", "prior")
STEP_RANGES = ("data", "sampler", "forward", "health_check", "backward", "optimizer")  # in step order
BACKWARD_NODE = "autograd::engine::evaluate_function: "


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _repeated(fn, steps: int, repeats: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds per call of `fn`, one mean per repeat of `steps` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    means = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        means.append((time.perf_counter() - t0) / steps)
    return means


def _figure(name: str, seconds: list[float]) -> dict:
    """`name`_ms (the median of the repeats), `name`_ms_repeats, `name`_spread ((max - min) / median)."""
    ms = [1e3 * s for s in seconds]
    median = statistics.median(ms)
    return {f"{name}_ms": median, f"{name}_ms_repeats": ms, f"{name}_spread": (max(ms) - min(ms)) / median}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ----------------------------------------------------------------------------- the profiled breakdown


@contextlib.contextmanager
def net_ranges(model: torch.nn.Module):
    """Each net's forward inside a record_function range of its name, while the block runs."""
    for name in NETS:
        module = getattr(model, name)

        def ranged(*args, _forward=module.forward, _name=name, **kwargs):
            with record_function(_name):
                return _forward(*args, **kwargs)

        module.forward = ranged  # an instance attribute: nn.Module.__call__ finds it before the class's
    try:
        yield
    finally:
        for name in NETS:
            del getattr(model, name).forward


def _ranges(event) -> list[str]:
    """Our range names enclosing `event` (itself included), innermost first."""
    names, e = [], event
    while e is not None:
        if e.name in NETS or e.name in STEP_RANGES:
            names.append(e.name)
        e = e.cpu_parent
    return names


def _forward_part(names: list[str]) -> str | None:
    """The part a forward-side event belongs to: the sampler owns the prior calls inside it; otherwise the
    innermost net, else the step range."""
    if "sampler" in names:
        return "sampler"
    for name in names:
        if name in NETS:
            return f"{name}_forward"
    if not names:
        return None
    return {"forward": "other_forward", "backward": "other_backward"}.get(names[-1], names[-1])


def breakdown(events, steps: int, cuda: bool) -> dict:
    """Per part, the time of one step (mean over `steps`): host_ms, the CPU time of the part's ops and Python
    between them (each event's self time, so the parts add up to the time inside the ranges); on CUDA also
    device_ms, the kernel time the part launched. A backward op is charged to the part whose forward op
    made its autograd node (same sequence number); "other" is the loss terms and the gradient accumulation.
    """
    events = list(events)
    made_by = {}  # forward op sequence number -> part
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith(BACKWARD_NODE):
            part = _forward_part(_ranges(e))
            if part is not None and part.endswith("_forward"):
                made_by[e.sequence_nr] = part
    host, device = defaultdict(float), defaultdict(float)
    for e in events:
        node = e
        while node is not None and not node.name.startswith(BACKWARD_NODE):
            node = node.cpu_parent
        names = _ranges(e)
        if node is not None and "sampler" not in names:  # inside a backward node (the sampler's are its own)
            part = made_by.get(node.sequence_nr, "other_forward").replace("_forward", "_backward")
        else:
            part = _forward_part(names)
        if part is None:
            continue
        host[part] += e.self_cpu_time_total
        if cuda:  # self_cuda_time_total in older torch
            device[part] += getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
    order = ["data", "sampler", *(f"{n}_forward" for n in NETS), "other_forward", "health_check",
             *(f"{n}_backward" for n in NETS), "other_backward", "optimizer"]
    parts = {}
    for part in order:
        if part in host or part in device:
            parts[part] = {"host_ms": host[part] / steps / 1e3}
            if cuda:
                parts[part]["device_ms"] = device[part] / steps / 1e3
    return parts


def profiled(fn, steps: int, device: torch.device, model: torch.nn.Module) -> dict:
    """Run `fn` `steps` times under the PyTorch profiler; the per-part breakdown of one step."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with net_ranges(model), profile(activities=activities) as prof:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        wall = (time.perf_counter() - t0) / steps
    parts = breakdown(prof.events(), steps, cuda)
    out = {"steps": steps, "step_ms_profiled": 1e3 * wall, "parts": parts,
           "host_ms_total": sum(p["host_ms"] for p in parts.values())}
    if cuda:
        out["device_ms_total"] = sum(p["device_ms"] for p in parts.values())
    return out


# ----------------------------------------------------------------------------- the benchmark


def _device_batch(m: C.ModelConfig, bu: int, bl: int, device: torch.device, fmt: torch.memory_format):
    """A synthetic batch already on the device (x_u, x_l, y_l), shaped and laid out as training's."""
    x_u = torch.randn(bu, *m.x_shape, device=device).tanh()
    x_l = torch.randn(bl, *m.x_shape, device=device).tanh()
    if m.likelihood == "multinomial":
        x_u, x_l = x_u.abs().round(), x_l.abs().round()
    if len(m.x_shape) == 3:
        x_u, x_l = x_u.contiguous(memory_format=fmt), x_l.contiguous(memory_format=fmt)
    return x_u, x_l, torch.randint(0, m.num_classes, (bl,), device=device)


def _fed_by_the_pipeline(cfg: C.Config, url: str, device: torch.device, fmt: torch.memory_format, step):
    """`step(x_u, x_l, y_l)` fed as training feeds it: the shard readers, then data.DeviceBatches."""
    stream = data.DeviceBatches(data.train_batches(
        url, batch_unlabelled=cfg.data.batch_unlabelled, batch_labelled=cfg.data.batch_labelled,
        seed=cfg.train.seed, num_workers=cfg.data.workers, shuffle_buffer=cfg.data.shuffle_buffer,
        cache_mb=cfg.data.cache_mb, uint8_images=True), device, fmt)

    def loaded_step():
        with record_function("data"):
            batch = next(stream)
        step(batch["x_u"], batch["x_l"], batch["y_l"])

    return loaded_step


def run(cfg: C.Config, steps: int = 200, warmup: int = 20, end_to_end: bool = True, repeats: int = 3,
        profile_steps: int = 10, eager: bool = True) -> dict:
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
    x_u, x_l, y_l = _device_batch(m, bu, bl, device, fmt)
    n = s.num_chains or bu
    captured = CapturedLangevin(model.prior, enabled=s.cuda_graph)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.train.mixed_precision == "bf16")
    monitor = health.Monitor(cfg)

    def negatives(sampler):  # Algorithm 1 step 2 as the training loop runs it (sampler None: eager)
        return sample_negatives(model.prior, bank, n, s, m.sigma0, sampler=sampler)

    def step(sampler, xu=x_u, xl=x_l, yl=y_l):
        with record_function("sampler"):
            z_neg = negatives(sampler)
        with record_function("forward"), torch.autocast(**amp):
            terms = model(xu, xl, yl, z_neg)
        with record_function("health_check"):  # the training loop's one host sync per step, before backward
            monitor.status(terms, False).cpu()
        with record_function("backward"):
            terms["loss"].backward()
        with record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "batch": {"unlabelled": bu, "labelled": bl, "chains": n}, "langevin_steps": s.steps,
           "mixed_precision": cfg.train.mixed_precision, "channels_last": fmt is torch.channels_last,
           "cuda_graph": s.cuda_graph, "timing": {"steps": steps, "repeats": repeats, "warmup": warmup}}
    t_step = _repeated(lambda: step(captured), steps, repeats, warmup, device)
    t_sampler = _repeated(lambda: negatives(captured), steps, repeats, warmup, device)
    out.update(sampler_backend=captured.backend, graph_captures=captured.captures)
    out.update(**_figure("step", t_step), **_figure("sampler", t_sampler))
    out.update(samples_per_s=(bu + bl) / statistics.median(t_step),
               sampler_share=statistics.median(t_sampler) / statistics.median(t_step))
    if eager:
        t_step_eager = _repeated(lambda: step(None), steps, repeats, warmup, device)
        t_sampler_eager = _repeated(lambda: negatives(None), steps, repeats, warmup, device)
        out.update(**_figure("eager_step", t_step_eager), **_figure("eager_sampler", t_sampler_eager))
        out["eager_over_captured_step"] = statistics.median(t_step_eager) / statistics.median(t_step)
    timed_step = lambda: step(captured)  # noqa: E731 - what the profiler records without shards
    if url is not None:
        timed_step = _fed_by_the_pipeline(cfg, url, device, fmt, lambda *batch: step(captured, *batch))
        t_e2e = _repeated(timed_step, steps, repeats, warmup, device)
        out.update(**_figure("end_to_end_step", t_e2e), end_to_end_samples_per_s=(bu + bl) / statistics.median(t_e2e),
                   end_to_end_over_step=statistics.median(t_step) / statistics.median(t_e2e),
                   loader_workers=cfg.data.workers)
    if profile_steps:
        out["profile"] = {"end_to_end": url is not None, **profiled(timed_step, profile_steps, device, model)}
    out["peak_memory_mb"] = _peak_memory_mb(device)
    return out


def _rounded(value):
    """Floats to 4 decimals, for reading (the spread between repeats is far larger than the digits dropped)."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=200, help="timed calls per repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of every figure (median and spread)")
    p.add_argument("--warmup", type=int, default=20, help="untimed calls before the first repeat")
    p.add_argument("--profile-steps", type=int, default=10, help="steps under the profiler (0: no breakdown)")
    p.add_argument("--no-eager", action="store_true", help="skip the eager-sampler figures")
    p.add_argument("--no-end-to-end", action="store_true", help="skip the run with the real shard loader")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    for flag, low in (("steps", 1), ("repeats", 1), ("warmup", 0), ("profile_steps", 0)):
        if getattr(args, flag) < low:
            print(f"error: --{flag.replace('_', '-')} is {getattr(args, flag)}; use {low} or more", file=sys.stderr)
            return 2
    try:
        cfg = C.load_config(args.config, args.overrides)
        result = run(cfg, args.steps, args.warmup, not args.no_end_to_end, args.repeats, args.profile_steps,
                     not args.no_eager)
    except (C.ConfigError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(_rounded(result), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
