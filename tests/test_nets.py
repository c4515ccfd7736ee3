"""Encoders, generators and the prior: shapes, finiteness, init, WRN-28-10, config errors."""

import math

import pytest
import torch

from ssl_ebm.config import ConfigError, ModelConfig, SamplerConfig
from pairings import PAIRINGS, tiny_config
from ssl_ebm.nets import Prior, build_encoder, build_generator



@pytest.mark.parametrize("name", PAIRINGS)
def test_shapes_and_finite(name):
    cfg = tiny_config(name)
    x = torch.randn(4, *cfg.x_shape)
    mu, logvar = build_encoder(cfg)(x)
    assert mu.shape == logvar.shape == (4, cfg.z_dim)
    out = build_generator(cfg)(mu)
    assert out.shape == (4, *cfg.x_shape)
    prior = Prior(cfg)
    assert prior(mu).shape == (4, cfg.num_classes) and prior.free_energy(mu).shape == (4,)
    for t in (mu, logvar, out, prior(mu)):
        assert torch.isfinite(t).all()
    if cfg.generator == "deconv":
        assert out.abs().max() <= 1.0  # tanh output for images in [-1, 1]


def test_logvar_softly_bounded():
    cfg = tiny_config("mlp+mlp gaussian")
    enc = build_encoder(cfg)
    _, logvar = enc(1e4 * torch.randn(8, *cfg.x_shape))
    assert logvar.abs().max() <= 10.0


def test_wrn_28_10_builds():
    cfg = ModelConfig(encoder="wrn", generator="deconv", x_shape=(3, 32, 32), wrn_depth=28, wrn_width=10)
    n = sum(p.numel() for p in build_encoder(cfg).parameters())
    assert 36.0e6 < n < 37.0e6  # WRN-28-10: 36.5M parameters
    cfg2 = ModelConfig(encoder="wrn", generator="deconv", x_shape=(3, 32, 32))
    assert 1.4e6 < sum(p.numel() for p in build_encoder(cfg2).parameters()) < 1.6e6  # WRN-28-2: 1.5M


def test_xavier_normal_init():
    cfg = ModelConfig(z_dim=100, prior_hidden=200, num_classes=10)
    first = Prior(cfg).net[0]
    assert first.weight.std().item() == pytest.approx(math.sqrt(2 / (100 + 200)), rel=0.05)
    assert first.bias.abs().max() == 0


def test_prior_is_fp32_under_bf16_autocast():
    prior = Prior(ModelConfig(z_dim=4))
    z = torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, energy = prior(z.bfloat16()), prior.free_energy(z)
    assert logits.dtype == energy.dtype == torch.float32
    torch.testing.assert_close(energy, torch.logsumexp(prior(z), -1))  # eq. 5


@pytest.mark.parametrize("activation", ["gelu", "relu", "leaky_relu", "elu", "silu", "tanh"])
def test_prior_activations(activation):
    prior = Prior(ModelConfig(z_dim=4, prior_activation=activation))
    assert torch.isfinite(prior.free_energy(torch.randn(2, 4))).all()


def test_prior_spectral_norm():
    prior = Prior(ModelConfig(z_dim=4, prior_hidden=32, prior_spectral_norm=True))
    z = torch.randn(16, 4, requires_grad=True)
    for _ in range(20):  # power iterations run in training-mode forwards
        prior.free_energy(z)
    prior.free_energy(z).sum().backward()
    assert all(p.grad is not None for p in prior.parameters())
    for layer in prior.net:
        if hasattr(layer, "weight"):
            assert torch.linalg.matrix_norm(layer.weight.detach(), ord=2) < 1.05


@pytest.mark.parametrize("make, field, words", [
    (lambda: ModelConfig(encoder="resnet"), "model.encoder", "wrn, conv, mlp"),
    (lambda: ModelConfig(generator="gan"), "model.generator", "deconv, mlp"),
    (lambda: ModelConfig(encoder="conv", generator="mlp", x_shape=(1, 20, 20)), "model.x_shape",
     "the conv encoder reads only 28x28 or 32x32"),
    (lambda: ModelConfig(encoder="conv", x_shape=(784,)), "model.x_shape", "need an image shape"),
    (lambda: ModelConfig(likelihood="bernoulli"), "model.likelihood", "gaussian, multinomial"),
    (lambda: ModelConfig(encoder="wrn", generator="deconv", x_shape=(3, 64, 64)), "model.x_shape", "28x28 or 32x32"),
    (lambda: ModelConfig(encoder="mlp", generator="deconv", x_shape=(1, 28, 32)), "model.x_shape", "28x28 or 32x32"),
    (lambda: ModelConfig(encoder="wrn", x_shape=(64,)), "model.x_shape", "[C, H, W]"),
    (lambda: ModelConfig(encoder="wrn", generator="deconv", x_shape=(3, 32, 32), wrn_depth=27), "model.wrn_depth",
     "6n + 4"),
    (lambda: ModelConfig(num_classes=1), "model.num_classes", "at least 2"),
    (lambda: ModelConfig(prior_activation="swish"), "model.prior_activation", "gelu, relu"),
    (lambda: SamplerConfig(step_size=-0.1), "sampler.step_size", "> 0"),
    (lambda: SamplerConfig(num_chains=20, bank_size=10), "sampler.num_chains", "bank_size"),
])
def test_invalid_construction_is_one_clear_error(make, field, words):
    with pytest.raises(ConfigError) as err:
        make()
    msg = str(err.value)
    assert msg.startswith(field + ":") and words in msg and "\n" not in msg
