"""log p(x|z) against torch.distributions, and the analytic KL(q || p0) against Monte Carlo."""

import math

import pytest
import torch
from torch.distributions import Multinomial, Normal

from ssl_ebm.likelihood import kl_to_p0, log_likelihood


def test_gaussian_matches_normal_log_prob():
    x, out = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    expected = Normal(out, 0.3).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(log_likelihood("gaussian", x, out, 0.3), expected)


def test_multinomial_matches_distribution_up_to_the_coefficient():
    torch.manual_seed(0)
    logits = torch.randn(4, 12)
    counts = Multinomial(20, logits=torch.randn(12)).sample((4,))
    log_coef = torch.lgamma(counts.sum(1) + 1) - torch.lgamma(counts + 1).sum(1)
    expected = torch.stack([Multinomial(int(c.sum()), logits=l).log_prob(c) for c, l in zip(counts, logits)])
    torch.testing.assert_close(log_likelihood("multinomial", counts, logits, 1.0), expected - log_coef)


def test_fp32_from_bf16_inputs():
    x, out = torch.randn(2, 8).bfloat16(), torch.randn(2, 8).bfloat16()
    assert log_likelihood("gaussian", x, out, 0.5).dtype == torch.float32
    assert kl_to_p0(x, out, 1.0).dtype == torch.float32


def test_unknown_kind_names_the_choices():
    with pytest.raises(ValueError, match="gaussian, multinomial"):
        log_likelihood("poisson", torch.zeros(1, 2), torch.zeros(1, 2), 1.0)


@pytest.mark.parametrize("sigma0", [1.0, 0.3])
def test_kl_matches_monte_carlo(sigma0):
    gen = torch.Generator().manual_seed(0)
    mu = torch.tensor([[0.5, -1.0, 0.2]], dtype=torch.float64)
    logvar = torch.tensor([[-0.5, 0.3, -2.0]], dtype=torch.float64)
    std = (0.5 * logvar).exp()
    z = mu + std * torch.randn(200_000, 3, generator=gen, dtype=torch.float64)
    log_ratio = Normal(mu, std).log_prob(z).sum(1) - Normal(0.0, sigma0).log_prob(z).sum(1)
    se = log_ratio.std() / math.sqrt(len(z))
    analytic = kl_to_p0(mu, logvar, sigma0)
    assert abs(float(analytic) - float(log_ratio.mean())) < 4 * float(se)
