"""The Langevin sampler (eq. 6), the chain bank, and sample_negatives."""

import pytest
import torch

from ssl_ebm.config import ConfigError, ModelConfig, SamplerConfig
from ssl_ebm.langevin import ChainBank, device_key, langevin, same_device, sample_negatives
from ssl_ebm.langevin_graph import CapturedLangevin
from ssl_ebm.model import LatentEBM
from ssl_ebm.nets import Prior

Z = 4


def small_prior(seed: int = 0, **kw) -> Prior:
    torch.manual_seed(seed)
    return Prior(ModelConfig(**{"z_dim": Z, "num_classes": 3, "prior_hidden": 16, **kw}))


def test_grad_free_energy_is_softmax_average_of_logit_grads():
    """eq. 6: grad_z F(z) = E_{p(y|z)}[grad_z f_y(z)]."""
    prior = small_prior()
    z = torch.randn(5, Z, requires_grad=True)
    (grad_F,) = torch.autograd.grad(prior.free_energy(z).sum(), z)
    jac_BKZ = torch.stack([torch.autograd.functional.jacobian(prior, z_i[None])[0, :, 0] for z_i in z.detach()])
    p_BK = torch.softmax(prior(z), -1).detach()
    torch.testing.assert_close(grad_F, torch.einsum("bk,bkz->bz", p_BK, jac_BKZ))


def test_steps_follow_eq_6_with_given_noise():
    prior, sigma0, s = small_prior(), 0.7, 0.3
    z0, noise = torch.randn(6, Z), torch.randn(3, 6, Z)
    z = z0.clone()
    for t in range(3):
        z.requires_grad_(True)
        (g,) = torch.autograd.grad(prior.free_energy(z).sum(), z)
        z = (z + s * s / 2 * (g - z / sigma0**2) + s * noise[t]).detach()
    torch.testing.assert_close(langevin(prior, z0, steps=3, step_size=s, sigma0=sigma0, noise=noise), z)


def test_drift_clip_caps_the_drift_norm():
    prior, s = small_prior(), 0.5
    z0 = 50 * torch.randn(8, Z)  # far out: |drift| ~ |z| / sigma0^2 is large
    moved = langevin(prior, z0, steps=1, step_size=s, sigma0=1.0, noise=torch.zeros(1, 8, Z), drift_clip=2.0)
    torch.testing.assert_close((moved - z0).norm(dim=1), torch.full((8,), s * s / 2 * 2.0))


@pytest.mark.parametrize("captured", [False, True], ids=["eager", "captured"])
def test_samples_the_symbol_vector_mixture(captured):
    """f(z) = (a z1, -a z1), sigma0 = 1: p(z1) = N(a,1)/2 + N(-a,1)/2, so E z1^2 = 1 + a^2; others N(0, 1).

    2,000 steps as 100 sampler calls of 20 (persistent chains, as training runs them), through the
    eager sampler and the captured one (langevin_graph; its static-buffer program on CPU)."""
    a, n = 2.0, 5_000
    prior = Prior(ModelConfig(z_dim=3, num_classes=2, prior_hidden=2, prior_activation="relu"))
    with torch.no_grad():  # relu(z1) - relu(-z1) = z1 through the real 3-layer MLP
        w1, _, w2, _, w3 = prior.net
        w1.weight.copy_(torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]]))
        w2.weight.copy_(torch.eye(2))
        w3.weight.copy_(torch.tensor([[a, -a], [-a, a]]))
        for layer in (w1, w2, w3):
            layer.bias.zero_()
    torch.testing.assert_close(prior(torch.tensor([[0.7, 5.0, -1.0]])), torch.tensor([[0.7 * a, -0.7 * a]]))

    sampler = CapturedLangevin(prior) if captured else (lambda z, **kw: langevin(prior, z, **kw))
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n, 3, generator=gen)
    for _ in range(100):
        z = sampler(z, steps=20, step_size=0.1, sigma0=1.0, generator=gen)
    if captured:
        assert sampler.backend == "static" and sampler.captures == 1 and sampler.replays == 100
    z1_sq = z[:, 0].pow(2)
    se = z1_sq.std() / n**0.5  # ~0.06; the discretisation bias at s = 0.1 is ~0.01, a drift twice too large ~0.5
    assert abs(z1_sq.mean().item() - (1 + a**2)) < 4 * se.item()
    assert abs(z[:, 0].mean().item()) < 4 * (5.0 / n) ** 0.5
    for j in (1, 2):
        assert abs(z[:, j].var().item() - 1.0) < 4 * (2.0 / n) ** 0.5


@pytest.mark.parametrize("prefill", [False, True])
def test_sampler_leaves_parameter_grads_alone(prefill):
    model = LatentEBM(ModelConfig(z_dim=Z, hidden=8, prior_hidden=8, x_shape=(5,)))
    if prefill:
        for p in model.parameters():
            p.grad = torch.randn_like(p)
    before = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    bank = ChainBank(64, Z, 1.0)
    cfg = SamplerConfig(steps=5, bank_size=64)
    with torch.no_grad():  # also from inside no_grad (e.g. an evaluation step)
        sample_negatives(model.prior, bank, 16, cfg, 1.0)
    sample_negatives(model.prior, bank, 16, cfg, 1.0)
    for n, p in model.named_parameters():
        assert p.requires_grad == flags[n]
        if before[n] is None:
            assert p.grad is None, n
        else:
            assert torch.equal(p.grad, before[n]), n


def test_returns_detached_fp32_and_ignores_bf16_autocast():
    prior = small_prior(prior_activation="gelu")
    z0, noise = torch.randn(32, Z), torch.randn(10, 32, Z)
    ref = langevin(prior, z0, steps=10, step_size=0.4, sigma0=1.0, noise=noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = langevin(prior, z0, steps=10, step_size=0.4, sigma0=1.0, noise=noise)
        from_bf16 = langevin(prior, z0.bfloat16(), steps=10, step_size=0.4, sigma0=1.0, noise=noise)
        short = sample_negatives(prior, None, 8, SamplerConfig(persistent=False, steps=3), 1.0)
    assert ref.dtype == mixed.dtype == from_bf16.dtype == short.dtype == torch.float32
    assert not (ref.requires_grad or mixed.requires_grad or short.requires_grad)
    assert torch.equal(mixed, ref)  # bitwise: autocast never reaches the sampler's arithmetic


def test_bank_init_draw_put_reinit():
    bank = ChainBank(1000, Z, sigma0=0.5, seed=3)
    assert not isinstance(bank, torch.nn.Module)
    assert bank.z.shape == (1000, Z) and abs(bank.z.std().item() - 0.5) < 0.03
    idx, z = bank.draw(100)
    assert idx.unique().numel() == 100 and torch.equal(z, bank.z[idx])
    bank.put(idx, torch.zeros(100, Z))
    assert bank.z[idx].abs().max() == 0
    assert torch.equal(bank.reinit(idx[:10]), idx[:10]) and (bank.z[idx[:10]] != 0).all()
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[idx[10:20]] = True
    bank.reinit(mask)
    assert (bank.z[idx[10:20]] != 0).all() and (bank.z[idx[20:]] == 0).all()
    assert (bank.z[idx[20:]] == 0).all()
    bank.reinit(1.0)
    assert (bank.z != 0).all()
    with pytest.raises(ValueError, match="bank_size"):
        bank.draw(1001)


def test_persistent_mode_updates_the_drawn_chains():
    prior, bank = small_prior(), ChainBank(200, Z, 1.0)
    old = bank.z.clone()
    z = sample_negatives(prior, bank, 50, SamplerConfig(steps=4, step_size=0.3, bank_size=200), 1.0)
    changed = (bank.z != old).any(1)
    assert z.shape == (50, Z) and changed.sum() == 50
    assert torch.equal(bank.z[changed].sort(0).values, z.sort(0).values)


def test_bank_state_round_trip_continues_bitwise():
    prior = small_prior()
    cfg = SamplerConfig(steps=3, step_size=0.4, bank_size=100, reinit_frac=0.3)
    bank = ChainBank(100, Z, 1.0, seed=7)
    sample_negatives(prior, bank, 20, cfg, 1.0)
    state = bank.state_dict()
    expected = [sample_negatives(prior, bank, 20, cfg, 1.0) for _ in range(3)]
    resumed = ChainBank(100, Z, 1.0, seed=99)
    resumed.load_state_dict(state)
    for want in expected:
        assert torch.equal(sample_negatives(prior, resumed, 20, cfg, 1.0), want)
    assert torch.equal(resumed.z, bank.z)
    with pytest.raises(ConfigError, match="sampler.bank_size"):
        ChainBank(50, Z, 1.0).load_state_dict(state)


def test_short_run_mode_starts_fresh_each_call():
    prior = small_prior()
    cfg = SamplerConfig(persistent=False, steps=100, step_size=0.4)
    a = sample_negatives(prior, None, 30, cfg, 1.0, generator=torch.Generator().manual_seed(5))
    b = sample_negatives(prior, None, 30, cfg, 1.0, generator=torch.Generator().manual_seed(5))
    c = sample_negatives(prior, None, 30, cfg, 1.0, generator=torch.Generator().manual_seed(6))
    assert a.shape == (30, Z) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)  # no state carried between calls
    bank = ChainBank(40, Z, 1.0)
    old = bank.z.clone()
    sample_negatives(prior, bank, 30, cfg, 1.0)
    assert torch.equal(bank.z, old)  # short-run ignores the bank
    z0 = sample_negatives(prior, None, 4000, SamplerConfig(persistent=False, steps=0), 0.5)
    assert abs(z0.std().item() - 0.5) < 0.02  # steps=0: plain draws from p0


class SqrtPrior(torch.nn.Module):
    """F(z) = sqrt(z_0): NaN gradients for the chains with z_0 < 0, finite ones elsewhere."""

    z_dim = Z

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def free_energy(self, z_BZ: torch.Tensor) -> torch.Tensor:
        return self.scale * z_BZ[:, 0].sqrt()


@pytest.mark.parametrize("captured", [False, True])
def test_non_finite_chains_are_never_stored(captured):
    prior, bank = SqrtPrior(), ChainBank(100, Z, 1.0, seed=1)
    cfg = SamplerConfig(steps=3, step_size=0.3, bank_size=100)
    old = bank.z.clone()
    sampler = CapturedLangevin(prior) if captured else None
    z = sample_negatives(prior, bank, 100, cfg, 1.0, sampler=sampler)
    bad = ~torch.isfinite(z).all(1)
    assert 0 < bad.sum() < 100, "the prior should break some chains and not others"
    assert torch.isfinite(bank.z).all()
    # Every chain came back (the bank draws all 100): the broken ones keep their stored values,
    # the finite ones are the new samples.
    stored = {tuple(r) for r in bank.z.tolist()}
    assert {tuple(r) for r in z[~bad].tolist()} <= stored
    assert stored - {tuple(r) for r in z[~bad].tolist()} <= {tuple(r) for r in old.tolist()}
    assert len(stored - {tuple(r) for r in z[~bad].tolist()}) == bad.sum()


def test_a_nan_prior_leaves_the_bank_unchanged():
    prior, bank = small_prior(), ChainBank(100, Z, 1.0, seed=2)
    with torch.no_grad():
        prior.net[0].weight.fill_(float("nan"))
    old = bank.z.clone()
    z = sample_negatives(prior, bank, 60, SamplerConfig(steps=3, step_size=0.3, bank_size=100), 1.0)
    assert not torch.isfinite(z).any()  # the caller still sees them (and its loss check fails)
    assert torch.equal(bank.z, old)


def test_same_device_treats_cuda_without_index_as_the_current_device():
    cuda, cuda0, cuda1 = torch.device("cuda"), torch.device("cuda:0"), torch.device("cuda:1")
    assert cuda != cuda0  # why a plain == is not enough on one GPU
    assert same_device(cuda, cuda0) and same_device(cuda0, cuda) and same_device("cuda", "cuda:0")
    assert not same_device(cuda, cuda1) and not same_device(cuda0, cuda1)
    assert same_device("cpu", torch.device("cpu")) and not same_device("cpu", cuda0)
    assert device_key("cuda") == device_key("cuda:0") == ("cuda", 0)
