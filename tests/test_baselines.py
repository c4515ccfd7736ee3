"""ssl_ebm.baselines: the VAT and Pi-model losses on our encoder + prior head."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ssl_ebm import baselines as B
from ssl_ebm.config import ModelConfig

VEC = ModelConfig(encoder="mlp", generator="mlp", x_shape=(8,), num_classes=3, z_dim=4, hidden=16, prior_hidden=16)


def test_vat_direction_is_the_adversarial_one_for_a_linear_model():
    # For softmax(Wx) with two classes, the KL grows fastest along +-(w1 - w0): the power iteration finds it.
    torch.manual_seed(0)
    model = nn.Linear(6, 2)
    x = torch.randn(32, 6)
    logits = model(x)
    r = B.vat_perturbation(model, x, logits, xi=1e-3, eps=0.5)
    assert torch.allclose(r.norm(dim=1), torch.full((32,), 0.5), atol=1e-5)
    w = (model.weight[1] - model.weight[0]).detach()
    cos = (r @ w).abs() / (r.norm(dim=1) * w.norm())
    assert cos.min() > 0.99, cos.min()


def test_vat_perturbation_increases_the_kl_more_than_random_directions():
    torch.manual_seed(1)
    model = B.Classifier(VEC)
    x = torch.randn(64, 8)
    with torch.no_grad():
        logits = model(x)
    r_adv = B.vat_perturbation(model, x, logits, xi=1e-2, eps=1.0)
    with torch.no_grad():
        kl_adv = B.kl_logits(logits, model(x + r_adv))
        kl_rand = torch.stack([B.kl_logits(logits, model(x + B._unit(torch.randn_like(x))))
                               for _ in range(20)]).mean()
        kl_none = B.kl_logits(logits, model(x))
    assert kl_none.abs() < 1e-6
    assert kl_adv > 3 * kl_rand > 0, (kl_adv, kl_rand)
    # the loss is that KL (p(y|x) fixed); and it trains the model: every parameter gets a gradient
    torch.manual_seed(2)
    loss = B.vat_loss(model, x, xi=1e-2, eps=1.0, logits_BK=logits)
    assert loss > 0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_pi_loss_zero_for_identical_passes_positive_for_noisy_ones():
    logits = torch.randn(10, 4)
    assert B.pi_loss(logits, logits.clone()) == 0
    other = logits + torch.randn(10, 4)
    assert B.pi_loss(logits, other) > 0
    assert torch.isclose(B.pi_loss(logits, other), B.pi_loss(other, logits))
    # adding a constant to all logits leaves the softmax, hence the loss, unchanged
    assert B.pi_loss(logits, logits + 3.0) < 1e-12
    torch.manual_seed(0)
    model = B.Classifier(VEC, input_noise=0.5, dropout=0.2)
    x = torch.randn(16, 8)
    model.eval()  # deterministic: two passes agree
    assert B.pi_loss(model(x), model(x)) == 0
    model.train()  # input noise and dropout: two passes differ
    a, b = model(x), model(x)
    loss = B.pi_loss(a, b)
    assert loss > 0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_entropy_and_rampup():
    assert torch.isclose(B.entropy_loss(torch.zeros(5, 4)), torch.tensor(math.log(4)))
    assert B.entropy_loss(torch.tensor([[20.0, 0.0, 0.0]])) < 1e-6
    ramp = [B.rampup(t, 100) for t in range(0, 120, 10)]
    assert ramp[0] == pytest.approx(math.exp(-5)) and ramp[-1] == 1.0 and ramp[10] == 1.0
    assert all(a < b for a, b in zip(ramp[:10], ramp[1:11]))
    assert B.rampup(5, 0) == 1.0


def test_classifier_on_images_with_the_wrn_encoder():
    cfg = ModelConfig(encoder="wrn", generator="deconv", x_shape=(3, 32, 32), num_classes=10, z_dim=8,
                      wrn_depth=10, wrn_width=1, gen_channels=8)
    torch.manual_seed(0)
    model = B.Classifier(cfg)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    logits = model(x)
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()
    loss = B.vat_loss(model, x, xi=1e-6, eps=2.0)
    assert torch.isfinite(loss)
    loss.backward()
    assert model.encoder.stem.weight.grad is not None and model.prior.net[0].weight.grad is not None


def test_classifier_rejects_bad_settings():
    with pytest.raises(ValueError, match="dropout"):
        B.Classifier(VEC, dropout=1.0)
