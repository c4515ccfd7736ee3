"""The Langevin sampler of langevin.py, captured once as a CUDA graph and replayed.

Twenty eager Langevin steps on the small prior MLP cost 16-20 ms on an H200 whatever the number
of chains: they are bound by kernel-launch latency (shared/NOTES.md). Captured as one graph, the
same steps cost about 2 ms. The graph reads the chains from a static input and the prior's
parameters in place (Adam updates them in place, so the graph always sees current weights); the
noise is drawn inside the graph from the default CUDA generator. It is captured again whenever the
chain count, the sampler settings or the parameters' storage change, so it is never stale.

On CPU (and under ZeRO-3, whose parameters are gathered per call) it falls back to the eager
sampler; both compute exactly the same update (identical when noise is supplied).

Shapes: N chains, Z latent dim.
"""

from __future__ import annotations

import torch

from ssl_ebm.langevin import langevin


class CapturedLangevin:
    """A callable with the signature of `langevin`, replayed from a CUDA graph when it can be."""

    def __init__(self, prior, *, enabled: bool = True, warmup: int = 3):
        self.prior = prior
        self.enabled = enabled
        self.warmup = warmup
        self._graph = None
        self._key = None
        self.captures = 0  # how many times a graph was captured (for tests and the benchmark)

    def _signature(self, z: torch.Tensor, steps: int, step_size: float, sigma0: float, drift_clip: float):
        ptrs = tuple(p.data_ptr() for p in self.prior.parameters())
        return (tuple(z.shape), z.device, steps, step_size, sigma0, drift_clip, ptrs)

    def _capture(self, z: torch.Tensor, kwargs: dict) -> None:
        self._static_in = z.detach().float().clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up outside the graph (allocator, cuBLAS workspaces)
            for _ in range(self.warmup):
                langevin(self.prior, self._static_in, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._static_out = langevin(self.prior, self._static_in, **kwargs)
        self._graph = graph
        self.captures += 1

    def __call__(self, z: torch.Tensor, *, steps: int, step_size: float, sigma0: float,
                 noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 drift_clip: float = 0.0) -> torch.Tensor:
        kwargs = dict(steps=steps, step_size=step_size, sigma0=sigma0, drift_clip=drift_clip)
        if not (self.enabled and z.is_cuda and noise is None and generator is None and steps > 0):
            return langevin(self.prior, z, noise=noise, generator=generator, **kwargs)
        key = self._signature(z, steps, step_size, sigma0, drift_clip)
        if key != self._key:
            self._capture(z, kwargs)
            self._key = key
        self._static_in.copy_(z.detach().float())
        self._graph.replay()
        return self._static_out.clone()
