"""log p(x|z) against torch.distributions, and the analytic KL(q || p0) against Monte Carlo."""

import math

import pytest
import torch
from torch.distributions import Multinomial, Normal

from ssl_ebm.likelihood import kl_to_p0, log_likelihood, trained_likelihood


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


BLOCKS = ((3, 4), (8, 2))  # a table vector: 3 numbers, a 4-way block, 1 number, a 2-way block


def one_hot_table(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=gen)
    for start, size in BLOCKS:
        x[:, start:start + size] = torch.nn.functional.one_hot(torch.randint(size, (n,), generator=gen), size).float()
    return x


def test_mixed_is_the_gaussian_on_the_numbers_plus_a_categorical_per_block():
    from torch.distributions import OneHotCategorical

    x, out = one_hot_table(6), torch.randn(6, 10)
    numeric = [0, 1, 2, 7]
    expected = Normal(out[:, numeric], 0.5).log_prob(x[:, numeric]).sum(1)
    for start, size in BLOCKS:
        expected = expected + OneHotCategorical(logits=out[:, start:start + size]).log_prob(x[:, start:start + size])
    torch.testing.assert_close(log_likelihood("mixed", x, out, 0.5, BLOCKS), expected)
    # and it is not the Gaussian on every column: the blocks' codes are scored as categories
    assert not torch.allclose(log_likelihood("gaussian", x, out, 0.5), expected)
    # the gradient on a block's logits is code - softmax, on a number (x - out) / sigma^2
    out.requires_grad_(True)
    log_likelihood("mixed", x, out, 0.5, BLOCKS).sum().backward()
    torch.testing.assert_close(out.grad[:, 3:7], x[:, 3:7] - torch.softmax(out[:, 3:7].detach(), -1))
    torch.testing.assert_close(out.grad[:, numeric], (x[:, numeric] - out[:, numeric].detach()) / 0.25)
    # without blocks (a table of numbers only) it is the Gaussian likelihood, bit for bit, and so is the
    # likelihood a run trains with
    out = out.detach()
    assert torch.equal(log_likelihood("mixed", x, out, 0.5), log_likelihood("gaussian", x, out, 0.5))
    numbers_only = {"columns": {"numeric": ["a", "b"], "categorical": []}}
    assert trained_likelihood("mixed", numbers_only) == trained_likelihood("gaussian", {}) == "gaussian"
    assert trained_likelihood("mixed", {"columns": {"categorical": [{"start": 3, "size": 4}]}}) == "mixed"


def test_mixed_likelihood_trains_the_generator():
    from pairings import tiny_config
    from ssl_ebm.model import LatentEBM

    torch.manual_seed(0)
    model = LatentEBM(tiny_config("mlp+mlp gaussian", likelihood="mixed", x_shape=(10,), categorical_blocks=BLOCKS))
    x_u, eps = one_hot_table(8, seed=1), torch.randn(8, model.cfg.z_dim)
    terms = model(x_u=x_u, z_neg=torch.randn(5, model.cfg.z_dim), eps=eps)
    terms["loss"].backward()
    for name, p in model.generator.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    with torch.no_grad():  # recon is the mixed log-likelihood of the generator's output at z+
        mu, logvar = model.encoder(x_u)
        out = model.generator(mu + torch.exp(0.5 * logvar) * eps)
    torch.testing.assert_close(terms["recon"], log_likelihood("mixed", x_u, out, model.cfg.obs_sigma, BLOCKS).mean())
    assert not torch.allclose(terms["recon"], log_likelihood("gaussian", x_u, out, model.cfg.obs_sigma).mean())


def test_mixed_blocks_are_validated_and_read_from_a_table_manifest():
    from ssl_ebm.config import ConfigError, ModelConfig
    from ssl_ebm.likelihood import categorical_blocks

    ModelConfig(likelihood="mixed", x_shape=(10,), categorical_blocks=BLOCKS)
    with pytest.raises(ConfigError, match="model.categorical_blocks: got \\[\\[3, 4\\], \\[5, 4\\]\\]; each block"):
        ModelConfig(likelihood="mixed", x_shape=(10,), categorical_blocks=((3, 4), (5, 4)))  # overlapping
    with pytest.raises(ConfigError, match="the mixed likelihood is for table vectors"):
        ModelConfig(likelihood="mixed", encoder="wrn", generator="deconv", x_shape=(3, 32, 32))
    manifest = {"dataset": "table", "columns": {"categorical": [{"name": "job", "start": 3, "size": 4},
                                                               {"name": "city", "start": 8, "size": 2}]}}
    assert categorical_blocks(manifest) == BLOCKS
    assert categorical_blocks({"dataset": "magic_gamma", "columns": None}) == ()  # numbers only: all Gaussian


def test_a_learned_std_per_dimension_is_the_gaussian_of_each_dimension_and_trains_with_the_generator():
    from ssl_ebm.config import ModelConfig, OptimConfig
    from ssl_ebm.model import OBS_SIGMA_MIN, LatentEBM

    torch.manual_seed(0)
    x, out = torch.randn(4, 3), torch.randn(4, 3)
    sigma = torch.tensor([0.5, 1.0, 2.0])
    want = torch.distributions.Normal(out, sigma).log_prob(x).sum(1)
    assert torch.allclose(log_likelihood("gaussian", x, out, sigma), want, atol=1e-5)
    # a tensor of one value equals the number
    assert torch.allclose(log_likelihood("gaussian", x, out, torch.full((3,), 0.7)),
                          log_likelihood("gaussian", x, out, 0.7), atol=1e-5)
    net = LatentEBM(ModelConfig(x_shape=(3,), num_classes=2, z_dim=2, hidden=8, prior_hidden=8, obs_sigma=0.5,
                                learn_obs_sigma=True))
    assert torch.allclose(net.observation_sigma(), torch.full((3,), 0.5))
    groups = {g["name"]: g["params"] for g in net.param_groups(OptimConfig())}
    assert any(p is net.obs_log_sigma for p in groups["generator"])
    assert not any(p is net.obs_log_sigma for p in groups["encoder"] + groups["prior"])
    terms = net(torch.randn(5, 3), torch.randn(2, 3), torch.tensor([0, 1]), torch.randn(6, 2))
    terms["loss"].backward()
    assert net.obs_log_sigma.grad is not None and net.obs_log_sigma.grad.abs().sum() > 0
    with torch.no_grad():
        net.obs_log_sigma.fill_(-10.0)
    assert torch.allclose(net.observation_sigma(), torch.full((3,), OBS_SIGMA_MIN))  # the floor
    with pytest.raises(Exception, match="model.learn_obs_sigma"):
        ModelConfig(likelihood="multinomial", learn_obs_sigma=True)
