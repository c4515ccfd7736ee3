"""The captured sampler (langevin_graph): the same chains as the eager one, never stale.

On CPU it runs its static-buffer program (the body a CUDA graph captures on GPU) eagerly; these tests
check that program and its plumbing. The GPU capture itself is exercised by `python -m ssl_ebm.bench`.
"""

import pytest
import torch

from ssl_ebm.config import ModelConfig, SamplerConfig
from ssl_ebm.langevin import ChainBank, langevin, sample_negatives
from ssl_ebm.langevin_graph import CapturedLangevin
from ssl_ebm.nets import Prior

Z, N = 4, 32
KW = dict(steps=7, step_size=0.3, sigma0=1.0)


def prior(seed: int = 0, **kw) -> Prior:
    torch.manual_seed(seed)
    return Prior(ModelConfig(**{"z_dim": Z, "num_classes": 3, "prior_hidden": 16, **kw}))


def test_same_chains_as_eager_for_supplied_noise_and_for_a_generator():
    p, z0, noise = prior(), torch.randn(N, Z), torch.randn(7, N, Z)
    captured = CapturedLangevin(p)
    assert torch.equal(captured(z0, noise=noise, **KW), langevin(p, z0, noise=noise, **KW))
    assert captured.backend == "static"
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(3):  # consecutive calls keep consuming the generator exactly as eager does
        assert torch.equal(captured(z0, generator=g1, **KW), langevin(p, z0, generator=g2, **KW))
    torch.manual_seed(1)
    a = captured(z0, **KW)
    torch.manual_seed(1)
    assert torch.equal(a, langevin(p, z0, **KW))
    assert captured.captures == 1 and captured.replays == 5


def test_drift_statistics_and_clipping_match_eager():
    p, z0, noise = prior(), 30 * torch.randn(N, Z), torch.randn(7, N, Z)
    got, want = {}, {}
    out = CapturedLangevin(p)(z0, noise=noise, drift_clip=2.0, stats=got, **KW)
    assert torch.equal(out, langevin(p, z0, noise=noise, drift_clip=2.0, stats=want, **KW))
    assert got.keys() == want.keys() and len(got) == 3
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert got["drift_clipped_frac"] > 0


def test_sees_in_place_updates_and_rebuilds_when_parameters_are_replaced():
    p, z0, noise = prior(), torch.randn(N, Z), torch.randn(7, N, Z)
    captured = CapturedLangevin(p)
    before = captured(z0, noise=noise, **KW)
    with torch.no_grad():  # what an optimizer step does: same storage, new values
        for w in p.parameters():
            w.add_(0.5 * torch.randn_like(w))
    after = captured(z0, noise=noise, **KW)
    assert captured.captures == 1 and not torch.equal(after, before)
    assert torch.equal(after, langevin(p, z0, noise=noise, **KW))
    layer = p.net[0]
    layer.weight = torch.nn.Parameter(torch.randn_like(layer.weight))  # new storage: must not replay stale weights
    replaced = captured(z0, noise=noise, **KW)
    assert captured.captures == 2
    assert torch.equal(replaced, langevin(p, z0, noise=noise, **KW))
    captured(z0[:8], noise=noise[:, :8], **KW)  # another chain count: another program
    captured(z0, noise=noise[:5], **{**KW, "steps": 5})  # other sampler settings: another program
    assert captured.captures == 4


def test_persistent_chains_evolve_identically_through_sample_negatives():
    p, cfg = prior(), SamplerConfig(steps=5, step_size=0.4, bank_size=200, reinit_frac=0.1)
    bank_a, bank_b = ChainBank(200, Z, 1.0, seed=7), ChainBank(200, Z, 1.0, seed=7)
    captured = CapturedLangevin(p)
    for _ in range(4):
        a = sample_negatives(p, bank_a, 50, cfg, 1.0, sampler=captured)
        b = sample_negatives(p, bank_b, 50, cfg, 1.0)
        assert torch.equal(a, b)
    assert torch.equal(bank_a.z, bank_b.z)
    assert torch.equal(bank_a.generator.get_state(), bank_b.generator.get_state())


def test_falls_back_to_eager_when_disabled_or_without_steps():
    p, z0 = prior(), torch.randn(N, Z)
    off = CapturedLangevin(p, enabled=False)
    torch.manual_seed(0)
    a = off(z0, **KW)
    torch.manual_seed(0)
    assert torch.equal(a, langevin(p, z0, **KW)) and off.backend == "eager" and off.captures == 0
    zero = CapturedLangevin(p)
    assert torch.equal(zero(z0, **{**KW, "steps": 0}), z0) and zero.backend == "eager"


def test_bad_noise_shape_is_one_clear_error():
    with pytest.raises(ValueError, match=r"noise has shape \(7, 8, 4\); expected \(steps, B, Z\)"):
        CapturedLangevin(prior())(torch.randn(N, Z), noise=torch.randn(7, 8, Z), **KW)


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_train_eval_mode_and_buffers_are_part_of_the_capture_key(spectral_norm):
    p, z0, noise = prior(prior_spectral_norm=spectral_norm), torch.randn(N, Z), torch.randn(7, N, Z)
    captured = CapturedLangevin(p)
    captured(z0, noise=noise, **KW)
    captured(z0, noise=noise, **KW)
    assert captured.captures == 1  # nothing changed: replayed
    p.eval()  # spectral norm stops its power iteration: another computation, another program
    got = captured(z0, noise=noise, **KW)
    assert captured.captures == 2 and torch.equal(got, langevin(p, z0, noise=noise, **KW))
    p.net[-1].train()  # one submodule's mode is enough
    captured(z0, noise=noise, **KW)
    assert captured.captures == 3
    p.register_buffer("extra", torch.zeros(3))  # a new buffer: storage the program never saw
    captured(z0, noise=noise, **KW)
    assert captured.captures == 4
    captured(z0.double(), noise=noise, **KW)  # another chain dtype
    assert captured.captures == 5



def test_the_warm_up_before_a_capture_leaves_the_prior_as_eager_does():
    """Spectral norm in training mode runs a power iteration on every forward, updating its u and v buffers in
    place. The warm-up before a capture (on CPU as on GPU) must not leave its extra iterations behind: after the
    captured sampler's calls the chains and every buffer are the eager sampler's, so a run that captures at update
    S+1 (resumed) continues as one that captured at update 1."""
    a, b = prior(prior_spectral_norm=True), prior(prior_spectral_norm=True)
    z0, noise = torch.randn(N, Z), torch.randn(7, N, Z)
    captured = CapturedLangevin(a)
    for _ in range(2):
        assert torch.equal(captured(z0, noise=noise, **KW), langevin(b, z0, noise=noise, **KW))
        state_a, state_b = a.state_dict(), b.state_dict()
        assert any(k.endswith("_u") for k in state_a)
        for k in state_a:
            assert torch.equal(state_a[k], state_b[k]), k
    assert captured.captures == 1 and captured.warmup > 0
