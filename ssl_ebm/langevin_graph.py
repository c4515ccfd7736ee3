"""The Langevin sampler of langevin.py, captured once as a CUDA graph and replayed every step.

Twenty eager Langevin steps on the small prior MLP cost 16-20 ms on an H200 whatever the number
of chains: they are bound by kernel-launch latency, not arithmetic (shared measurements in
docs/PERFORMANCE.md). Captured as one graph, the same steps cost about 2 ms.

How it stays exact and never stale:
- The graph body is `langevin()` itself, run on static buffers: the chains z (N, Z) and the noise
  eps (T, N, Z). Before each replay the chains are copied in and the noise is drawn into the static
  buffer, step by step, from the caller's generator (the chain bank's) or the global RNG: the same
  draws, in the same order, as the eager sampler makes. So the captured and eager samplers give the
  same chains for the same generator state (and for supplied noise), and a resumed run continues
  bitwise whichever one it uses.
- The prior's parameters are read in place (optimizers update them in place, so the graph always
  sees the current weights). The graph is captured again whenever anything it baked in changes:
  the chain count or device, the sampler settings, any parameter's or buffer's storage (a replaced
  parameter, a new state dict assigned rather than copied), or the prior's train/eval mode.
- Capture uses capture_error_mode="thread_local", so CUDA work of other threads (DataLoader pin
  memory, trackers) neither breaks the capture nor is refused while it runs.
- Parameters gathered per call (DeepSpeed ZeRO-3) would change storage every step: those priors
  use the eager sampler.

- The warm-up before a capture runs the body a few times; what it changes in the prior's buffers (the
  power iteration of spectral norm) is put back, so capturing leaves the prior as the eager sampler would.

On CPU there is no graph to capture: the same body runs eagerly on the same static buffers
("static" backend), after the same warm-up, so the plumbing is exercised by the CPU tests. `backend`
says which is used.

Shapes: N chains, Z latent dim, T steps.
"""

from __future__ import annotations

import torch

from ssl_ebm.langevin import device_key, langevin, same_device

STATS = ("drift_norm", "drift_norm_max", "drift_clipped_frac")


def _gathered_per_call(prior) -> bool:
    """True for parameters partitioned by DeepSpeed ZeRO-3 (their storage is swapped in per call)."""
    return any(hasattr(p, "ds_id") for p in prior.parameters())


class CapturedLangevin:
    """A callable with the signature of `langevin` (minus `prior`), replayed from a CUDA graph."""

    def __init__(self, prior, *, enabled: bool = True, warmup: int = 3):
        self.prior = prior
        self.enabled = enabled
        self.warmup = warmup
        self._key = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self.captures = 0  # static programs built (CUDA graphs captured) so far; one per run is the norm
        self.replays = 0  # calls served from the static buffers
        self.backend = "eager"  # of the last call: "cuda_graph", "static" (CPU) or "eager"

    # ------------------------------------------------------------------ capture

    def _signature(self, z: torch.Tensor, steps: int, step_size: float, sigma0: float, drift_clip: float,
                   with_stats: bool) -> tuple:
        """Everything the captured program bakes in: shapes, device, settings, the storage of every
        parameter and buffer, and each submodule's train/eval mode (dropout, batch norm and spectral
        norm compute differently in the two)."""
        tensors = tuple((t.data_ptr(), t.dtype, tuple(t.shape), t.requires_grad)
                        for t in (*self.prior.parameters(), *self.prior.buffers()))
        modes = tuple(m.training for m in self.prior.modules())
        return (tuple(z.shape), z.dtype, device_key(z.device), steps, step_size, sigma0, drift_clip, with_stats,
                tensors, modes)

    def _body(self) -> None:
        """One sampler call on the static buffers (what the graph holds)."""
        stats = {} if self._with_stats else None
        out = langevin(self.prior, self._z, noise=self._noise, stats=stats, **self._kwargs)
        self._out.copy_(out)
        if stats:
            for k in STATS:
                self._stats[k].copy_(stats[k])

    def _warm_up(self) -> None:
        """The body `warmup` times, then every buffer of the prior put back as it was. A forward can change
        buffers in place: spectral norm (model.prior_spectral_norm) runs a power iteration on each one in
        training mode, updating u and v. Left in, the warm-up's extra iterations would make a run that
        captures at update S+1 (a resumed one) differ from one that captured at update 1."""
        buffers = list(self.prior.buffers())
        saved = [b.detach().clone() for b in buffers]
        for _ in range(self.warmup):
            self._body()
        with torch.no_grad():
            for b, before in zip(buffers, saved):
                b.copy_(before)

    def _capture(self, z: torch.Tensor, kwargs: dict, with_stats: bool) -> None:
        self._kwargs, self._with_stats = kwargs, with_stats
        self._z = torch.zeros(z.shape, dtype=torch.float32, device=z.device)
        self._noise = torch.zeros((kwargs["steps"], *z.shape), dtype=torch.float32, device=z.device)
        self._out = torch.zeros_like(self._z)
        self._stats = {k: torch.zeros((), device=z.device) for k in STATS}
        self.captures += 1
        if z.device.type != "cuda":
            self._warm_up()  # nothing to capture; run as on GPU all the same, so the CPU tests cover it
            self._graph = None
            return
        side = torch.cuda.Stream(z.device)
        side.wait_stream(torch.cuda.current_stream(z.device))
        with torch.cuda.stream(side):  # warm up outside the graph (allocator, cuBLAS workspaces)
            self._warm_up()
        torch.cuda.current_stream(z.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: only this thread's illegal calls abort the capture, not another thread's
        # (DataLoader pin-memory, tracker threads) unrelated CUDA work during it.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._body()
        self._graph = graph

    # ------------------------------------------------------------------ call

    def __call__(self, z: torch.Tensor, *, steps: int, step_size: float, sigma0: float,
                 noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 drift_clip: float = 0.0, stats: dict | None = None) -> torch.Tensor:
        kwargs = dict(steps=steps, step_size=step_size, sigma0=sigma0, drift_clip=drift_clip)
        usable = (self.enabled and steps > 0 and not _gathered_per_call(self.prior)
                  and (generator is None or same_device(generator.device, z.device)))
        if not usable:
            self.backend = "eager"
            return langevin(self.prior, z, noise=noise, generator=generator, stats=stats, **kwargs)
        if noise is not None and tuple(noise.shape) != (steps, *z.shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}; expected (steps, B, Z) = {(steps, *z.shape)}")
        key = self._signature(z, steps, step_size, sigma0, drift_clip, stats is not None)
        if key != self._key:
            self._capture(z, kwargs, stats is not None)
            self._key = key
        self._z.copy_(z.detach())
        if noise is not None:
            self._noise.copy_(noise)
        else:  # the eager sampler's draws, in its order (langevin._randn is randn = normal_ on the same stream)
            for t in range(steps):
                self._noise[t].normal_(generator=generator)
        if self._graph is not None:
            self._graph.replay()
            self.backend = "cuda_graph"
        else:
            self._body()
            self.backend = "static"
        self.replays += 1
        if stats is not None:
            stats.update({k: v.clone() for k, v in self._stats.items()})
        return self._out.clone()
