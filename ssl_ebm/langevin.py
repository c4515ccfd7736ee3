"""Sampling the latent prior p_alpha(z) by Langevin dynamics (eq. 6), and the persistent chains.

One step, with F the negative energy of nets/prior.py (log p_alpha(z) = F(z) - |z|^2/(2 sigma0^2) + c):
    z <- z + (s^2 / 2) (grad_z F(z) - z / sigma0^2) + s * eps,   eps ~ N(0, I)
where grad_z F(z) = E_{softmax(f(z))}[grad_z f_y(z)] (eq. 6). Only the small prior is differentiated.

Shapes: B / N chains, Z latent dim, L chains in the bank, T steps.
"""

import torch

from ssl_ebm.config import ConfigError, SamplerConfig


def same_device(a: str | torch.device, b: str | torch.device) -> bool:
    """True when `a` and `b` name the same device, "cuda" (no index) meaning the current CUDA device.

    On one GPU Accelerate's device is torch.device("cuda"): a generator made on it keeps no index while
    tensors made on it land on cuda:0, and `==` on the two torch.devices is then False.
    """
    return device_key(a) == device_key(b)


def device_key(d: str | torch.device) -> tuple[str, int | None]:
    """(type, index) of a device with a missing CUDA index replaced by the current device's."""
    d = torch.device(d)
    if d.type == "cuda" and d.index is None:
        return d.type, torch.cuda.current_device() if torch.cuda.is_available() else 0
    return d.type, d.index


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """N(0, I) on `device`, drawn from `generator` (on its own device) or the global RNG."""
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def langevin(prior, z: torch.Tensor, *, steps: int, step_size: float, sigma0: float,
             noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
             drift_clip: float = 0.0, stats: dict | None = None) -> torch.Tensor:
    """Run `steps` Langevin steps on p_alpha(z) from z_BZ (eq. 6); returns a detached fp32 (B, Z).

    `prior` needs `free_energy(z_BZ) -> F_B`. Arithmetic is fp32 with autocast off, so a caller's
    bf16 region does not reach it. Gradients are taken with torch.autograd.grad w.r.t. z only:
    no parameter's .grad is touched and no requires_grad flag is changed. `noise` (T, B, Z) gives
    the eps of every step (exact comparisons); otherwise they come from `generator` (or the
    global RNG). drift_clip > 0 caps the per-chain norm of the drift grad log p_alpha(z).
    `stats`, if given, receives device scalars about the last step (no host sync): "drift_norm" and
    "drift_norm_max" (mean and max over chains of |grad log p_alpha(z)| before clipping) and
    "drift_clipped_frac" (the fraction of chains whose drift was clipped).
    """
    if step_size <= 0:
        raise ValueError(f"Langevin step_size must be > 0, got {step_size}")
    z_BZ = z.detach().float().clone()
    if noise is not None and tuple(noise.shape) != (steps, *z_BZ.shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}; expected (steps, B, Z) = {(steps, *z_BZ.shape)}")
    s = step_size
    with torch.autocast(device_type=z_BZ.device.type, enabled=False), torch.enable_grad():
        for t in range(steps):
            z_BZ.requires_grad_(True)
            (grad_F_BZ,) = torch.autograd.grad(prior.free_energy(z_BZ).sum(), z_BZ)
            z_BZ = z_BZ.detach()
            drift_BZ = grad_F_BZ.float() - z_BZ / sigma0**2  # grad_z log p_alpha(z)
            if stats is not None and t == steps - 1:
                norm_B = drift_BZ.norm(dim=1)
                stats.update(drift_norm=norm_B.mean(), drift_norm_max=norm_B.max(),
                             drift_clipped_frac=(norm_B > drift_clip).float().mean() if drift_clip > 0
                             else norm_B.new_zeros(()))
            if drift_clip > 0:
                norm_B1 = drift_BZ.norm(dim=1, keepdim=True)
                drift_BZ = drift_BZ * (drift_clip / norm_B1).clamp(max=1.0)
            eps_BZ = noise[t].to(z_BZ) if noise is not None else _randn(z_BZ.shape, generator, z_BZ.device)
            z_BZ = z_BZ + 0.5 * s * s * drift_BZ + s * eps_BZ
    return z_BZ.detach()


class ChainBank:
    """L persistent chains z- of Algorithm 1 (step 2), initialised from p0 = N(0, sigma0^2 I).

    A plain object, not an nn.Module and not a buffer (DDP would broadcast buffers from rank 0):
    every process owns its bank and saves it with state_dict(). It owns a torch.Generator used for
    everything random about the chains (which to draw, re-initialisation, Langevin noise in
    sample_negatives), so a resumed run continues bitwise.
    """

    def __init__(self, size: int, z_dim: int, sigma0: float, device: str | torch.device = "cpu", seed: int = 0):
        self.sigma0 = sigma0
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.z = self.sample_p0(size, z_dim)  # (L, Z)

    def __len__(self) -> int:
        return self.z.shape[0]

    def sample_p0(self, n: int, z_dim: int | None = None) -> torch.Tensor:
        """n fresh draws from p0, (n, Z), from the bank's generator."""
        z_dim = self.z.shape[1] if z_dim is None else z_dim
        return self.sigma0 * torch.randn((n, z_dim), generator=self.generator, device=self.device)

    def draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A random subset of n chains without replacement: (idx_N, copy of z_NZ)."""
        if n > len(self):
            raise ValueError(f"cannot draw {n} chains from a bank of {len(self)}: raise sampler.bank_size "
                             "or lower sampler.num_chains")
        idx_N = torch.randperm(len(self), generator=self.generator, device=self.device)[:n]
        return idx_N, self.z[idx_N].clone()

    def put(self, idx_N: torch.Tensor, z_NZ: torch.Tensor) -> None:
        """Write updated chains back; a chain that is not finite keeps its stored value.

        Chains are written before the training loop learns whether the step's loss is finite: a prior
        that gives NaN or infinite gradients must not poison the bank for every later step (and for the
        checkpoints the watchdog goes back to). Elementwise, so no host sync.
        """
        idx_N = idx_N.to(self.device)
        z_NZ = z_NZ.detach().to(self.z)
        finite_N1 = torch.isfinite(z_NZ).all(dim=1, keepdim=True)
        self.z[idx_N] = torch.where(finite_N1, z_NZ, self.z[idx_N])

    def reinit(self, which: float | torch.Tensor) -> torch.Tensor:
        """Re-initialise chains to p0. `which`: a fraction of the bank chosen at random, an index
        tensor, or a boolean mask of length L. Returns the re-initialised indices."""
        if isinstance(which, (float, int)) and not isinstance(which, bool):
            which = float(which)
            if not 0.0 <= which <= 1.0:
                raise ValueError(f"reinit fraction must be in [0, 1], got {which}")
            mask = torch.rand(len(self), generator=self.generator, device=self.device) < which
            idx = mask.nonzero().squeeze(1)
        elif which.dtype == torch.bool:
            idx = which.to(self.device).nonzero().squeeze(1)
        else:
            idx = which.to(self.device)
        self.z[idx] = self.sample_p0(idx.numel())
        return idx

    def state_dict(self) -> dict:
        return {"z": self.z.clone(), "generator": self.generator.get_state(), "sigma0": self.sigma0}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["z"].shape) != tuple(self.z.shape):
            raise ConfigError(f"sampler.bank_size / model.z_dim: the saved chain bank holds {tuple(state['z'].shape)} "
                              f"chains but this run has {tuple(self.z.shape)}; use the saved run's values "
                              "or start without resuming")
        self.z = state["z"].to(self.device).clone()
        self.generator.set_state(state["generator"].cpu())
        self.sigma0 = state["sigma0"]


def sample_negatives(prior, bank: ChainBank | None, n: int, cfg: SamplerConfig, sigma0: float,
                     generator: torch.Generator | None = None, device=None, stats: dict | None = None,
                     sampler=None) -> torch.Tensor:
    """n samples z- ~ p_alpha(z) for the negative phase of eq. 10, detached fp32 (n, Z).

    Persistent (cfg.persistent, Algorithm 1 step 2): draw n chains from `bank`, re-initialise each
    to p0 with probability cfg.reinit_frac, run cfg.steps Langevin steps, write them back; all
    randomness from the bank's generator. Short-run (not cfg.persistent; the authors' text code):
    fresh chains from p0 on every call, randomness from `generator` (or the global RNG); `bank` is
    ignored. `prior` must be the unwrapped prior module (free_energy and z_dim); `device` defaults
    to that of its parameters. `stats`: see `langevin`. `sampler`: a callable with the signature of
    `langevin` without `prior` (langevin_graph.CapturedLangevin); default the eager `langevin`.
    """
    if device is None:
        device = next(prior.parameters()).device
    if cfg.persistent:
        if bank is None:
            raise ValueError("persistent sampling needs a ChainBank; pass one or set sampler.persistent=false")
        idx_N, z_NZ = bank.draw(n)
        if cfg.reinit_frac > 0:
            # Draw n fresh candidates and keep them where a coin says so: no host sync on the count.
            fresh_N1 = torch.rand((n, 1), generator=bank.generator, device=bank.device) < cfg.reinit_frac
            z_NZ = torch.where(fresh_N1, bank.sample_p0(n), z_NZ)
        generator = bank.generator
    else:
        z_NZ = sigma0 * _randn((n, prior.z_dim), generator, torch.device(device))
    run = sampler if sampler is not None else (lambda z, **kw: langevin(prior, z, **kw))
    z_NZ = run(z_NZ.to(device), steps=cfg.steps, step_size=cfg.step_size, sigma0=sigma0,
               generator=generator, drift_clip=cfg.drift_clip, stats=stats)
    if cfg.persistent:
        bank.put(idx_N, z_NZ)
    return z_NZ
