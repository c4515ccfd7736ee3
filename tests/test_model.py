"""LatentEBM: the one total loss has exactly the gradients of Algorithm 1, steps 4-6."""

import math

import pytest
import torch

from pairings import PAIRINGS, tiny_config
from ssl_ebm.baselines import entropy_loss, pi_loss, vat_loss
from ssl_ebm.config import OptimConfig
from ssl_ebm.model import LatentEBM, batch_mutual_information, pseudo_label_loss

KEYS = {"loss", "recon", "kl", "F_pos", "F_neg", "z_pos_norm", "z_neg_norm", "ce", "acc_l", "mi", "vat", "consistency",
        "entropy", "pseudo", "latent_vat", "logvar_min", "logvar_max"}


def make(name: str, seed: int = 0, **kw) -> LatentEBM:
    torch.manual_seed(seed)
    return LatentEBM(tiny_config(name, **kw))


def batch(model: LatentEBM, n_u: int = 5, n_l: int = 3, n_neg: int = 7, seed: int | None = None):
    cfg = model.cfg
    if seed is not None:
        torch.manual_seed(seed)
    if cfg.likelihood == "multinomial":
        x = torch.randint(0, 4, (n_u + n_l, *cfg.x_shape)).float()
    else:
        x = torch.rand(n_u + n_l, *cfg.x_shape) * 2 - 1
    y = torch.randint(0, cfg.num_classes, (n_l,))
    return x[:n_u], x[n_u:], y, torch.randn(n_neg, cfg.z_dim)


def algorithm_1_grads(model, x_u, x_l, y_l, z_neg, seed):
    """Steps 4-6 of Algorithm 1, each from the paper's equations, as separate gradients to descend."""
    cfg, n_u = model.cfg, len(x_u)
    torch.manual_seed(seed)  # same eps as forward: one draw for [x_u; x_l]
    mu, logvar = model.encoder(torch.cat([x_u, x_l]))
    z_pos = mu + torch.exp(logvar / 2) * torch.randn_like(mu)
    mu_u, logvar_u, z_u, z_l = mu[:n_u], logvar[:n_u], z_pos[:n_u], z_pos[n_u:]

    out = model.generator(z_u).flatten(1)
    x = x_u.flatten(1)
    if cfg.likelihood == "gaussian":
        s, d = cfg.obs_sigma, x.shape[1]
        recon = (-((x - out) ** 2).sum(1) / (2 * s * s) - d * math.log(s * math.sqrt(2 * math.pi))).mean()
    else:
        recon = (x * (out - torch.logsumexp(out, 1, keepdim=True))).sum(1).mean()
    s0sq = cfg.sigma0**2
    kl = (0.5 * (logvar_u.exp() / s0sq + mu_u**2 / s0sq - 1 - logvar_u + math.log(s0sq))).sum(1).mean()
    elbo = recon - kl

    def energy(z):  # eq. 5, straight from the logits
        return torch.logsumexp(model.prior.net(z), 1)

    F_pos, F_neg = energy(z_u), energy(z_neg)
    log_p = torch.log_softmax(model.prior.net(z_l), 1)
    log_p_y = log_p[torch.arange(len(y_l)), y_l].mean()
    eps = cfg.label_smoothing  # the target (1 - eps) one-hot + eps / K
    supervised = -cfg.labelled_weight * ((1 - eps) * log_p_y + eps * log_p.mean(1).mean())  # step 6
    penalty = cfg.energy_penalty * (F_pos.pow(2).mean() + F_neg.pow(2).mean())  # a regulariser of the prior only

    prior_objective = -(F_pos.mean() - F_neg.mean()) + supervised + penalty  # step 4 (eq. 10) + step 6
    encoder_objective = -(elbo + F_pos.mean()) + supervised  # step 5 (eq. 11) + step 6
    generator_objective = -recon  # step 5 (eq. 11): only log p(x|z) depends on beta
    grads = {}
    for part, objective in (("prior", prior_objective), ("encoder", encoder_objective),
                            ("generator", generator_objective)):
        named = list(getattr(model, part).named_parameters())
        gs = torch.autograd.grad(objective, [p for _, p in named], retain_graph=True)
        grads.update({f"{part}.{n}": g for (n, _), g in zip(named, gs)})
    return grads


@pytest.mark.parametrize("name", ["mlp+mlp gaussian", "mlp+mlp multinomial", "wrn+deconv 3x32x32"])
@pytest.mark.parametrize("labelled_weight, energy_penalty, label_smoothing", [(1.0, 0.0, 0.0), (2.5, 0.1, 0.2)])
def test_total_loss_gradient_is_algorithm_1(name, labelled_weight, energy_penalty, label_smoothing):
    model = make(name, labelled_weight=labelled_weight, energy_penalty=energy_penalty, sigma0=0.8,
                 label_smoothing=label_smoothing)
    data = batch(model)
    # Two passes in training mode: BatchNorm uses batch statistics, so both see the same numbers.
    expected = algorithm_1_grads(model, *data, seed=11)
    torch.manual_seed(11)
    model(*data)["loss"].backward()
    for n, p in model.named_parameters():
        scale = expected[n].abs().max().clamp(min=1e-3)
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-4, atol=1e-5 * scale.item(), msg=n)


@pytest.mark.parametrize("name", PAIRINGS)
def test_every_parameter_gets_a_finite_nonzero_gradient(name):
    model = make(name)
    out = model(*batch(model))
    assert set(out) == KEYS
    for k, v in out.items():
        assert v.shape == () and v.dtype == torch.float32 and torch.isfinite(v), k
        assert v.requires_grad == (k == "loss"), k
    out["loss"].backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


def test_supervised_only_involves_encoder_and_prior():
    model = make("wrn+deconv 1x28x28")
    _, x_l, y_l, _ = batch(model)
    out = model(None, x_l, y_l, None)
    assert out["recon"] == out["kl"] == out["F_pos"] == out["F_neg"] == 0
    torch.testing.assert_close(out["loss"].detach(), out["ce"])
    out["loss"].backward()
    for n, p in model.named_parameters():
        if n.startswith("generator."):
            assert p.grad is None, n
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_unlabelled_only():
    model = make("mlp+mlp gaussian")
    x_u, _, _, z_neg = batch(model)
    out = model(x_u, None, None, z_neg)
    assert out["ce"] == out["acc_l"] == 0
    torch.testing.assert_close(out["loss"].detach(), -out["recon"] + out["kl"] - out["F_pos"] + out["F_neg"])


@pytest.mark.parametrize("name", ["mlp+mlp gaussian", "wrn+deconv 3x32x32"])
def test_energy_penalty_reaches_the_prior_only(name):
    grads = {}
    for penalty in (0.0, 0.5):
        model = make(name, energy_penalty=penalty)
        data = batch(model, seed=3)
        torch.manual_seed(5)
        model(*data)["loss"].backward()
        grads[penalty] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n in grads[0.0]:
        if n.startswith("prior."):
            continue
        torch.testing.assert_close(grads[0.5][n], grads[0.0][n], rtol=1e-5, atol=1e-7, msg=n)
    assert any(not torch.allclose(grads[0.5][n], grads[0.0][n]) for n in grads[0.0] if n.startswith("prior."))


def test_empty_labelled_batch_is_unlabelled_only():
    model = make("mlp+mlp gaussian")
    x_u, x_l, y_l, z_neg = batch(model, n_l=0)
    assert x_l.shape[0] == y_l.shape[0] == 0
    torch.manual_seed(1)
    out = model(x_u, x_l, y_l, z_neg)
    torch.manual_seed(1)
    want = model(x_u, None, None, z_neg)
    assert torch.isfinite(out["loss"]) and out["ce"] == out["acc_l"] == 0
    torch.testing.assert_close(out["loss"], want["loss"])
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    _, x_l, y_l, _ = batch(model)
    sup = model(x_u[:0], x_l, y_l, None)  # an empty unlabelled part: the supervised loss alone
    torch.testing.assert_close(sup["loss"].detach(), sup["ce"])
    with pytest.raises(ValueError, match="non-empty"):
        model(x_u[:0], x_l[:0], y_l[:0], z_neg)


def test_bad_calls_are_clear():
    model = make("mlp+mlp gaussian")
    x_u, x_l, y_l, z_neg = batch(model)
    with pytest.raises(ValueError, match="z_neg"):
        model(x_u, x_l, y_l, None)
    with pytest.raises(ValueError, match="model.x_shape"):
        model(x_u[:, :8], x_l, y_l, z_neg)
    with pytest.raises(ValueError, match="x_l and y_l"):
        model(x_u, x_l, None, z_neg)


def test_bf16_autocast_losses_are_fp32_and_close():
    model = make("wrn+deconv 3x32x32")
    data = batch(model)
    torch.manual_seed(0)
    ref = model(*data)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(*data)
    for k in ("loss", "recon", "kl", "F_pos", "F_neg", "ce"):
        assert mixed[k].dtype == torch.float32
        torch.testing.assert_close(mixed[k], ref[k], rtol=0.05, atol=0.05, msg=k)


def test_prediction_is_argmax_of_f_at_the_mean():
    model = make("mlp+mlp gaussian").eval()
    x = batch(model)[0]
    logits = model.predict_logits(x)
    mu, _ = model.encoder(x)
    torch.testing.assert_close(logits, model.prior(mu))
    proba = model.predict_proba(x)
    torch.testing.assert_close(proba.sum(1), torch.ones(len(x)))
    assert torch.equal(proba.argmax(1), logits.argmax(1))
    torch.testing.assert_close(model.free_energy(mu), torch.logsumexp(logits, 1))


def test_param_groups_partition_the_parameters():
    model = make("mlp+mlp gaussian")
    optim = OptimConfig(lr_prior=1e-5, lr_generator=2e-3, lr_encoder=3e-3)
    groups = model.param_groups(optim)
    assert [(g["name"], g["lr"]) for g in groups] == [("encoder", 3e-3), ("generator", 2e-3), ("prior", 1e-5)]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    torch.optim.Adam(groups, betas=optim.betas)  # accepted as is


def test_mutual_information_term():
    """model.mi_weight (the authors' code): loss = paper loss - mi_weight * I(y; z+), I in [0, log K]."""
    confident_even = torch.eye(3).repeat(2, 1) * 50  # each row sure of a class, classes used evenly
    torch.testing.assert_close(batch_mutual_information(confident_even), torch.tensor(math.log(3)), atol=1e-4, rtol=0)
    torch.testing.assert_close(batch_mutual_information(torch.zeros(6, 3)), torch.tensor(0.0))  # uniform: no information
    collapsed = torch.tensor([[50.0, 0, 0]]).repeat(6, 1)  # confident but always the same class
    assert batch_mutual_information(collapsed) < 1e-4
    data = batch(make("mlp+mlp gaussian"))
    torch.manual_seed(3)
    plain = make("mlp+mlp gaussian")(*data)
    torch.manual_seed(3)
    with_mi = make("mlp+mlp gaussian", mi_weight=100.0)(*data)
    assert plain["mi"] == 0 and 0 < with_mi["mi"] <= math.log(3)
    torch.testing.assert_close(with_mi["loss"], plain["loss"] - 100.0 * with_mi["mi"])
    with_mi["loss"].backward()  # the term reaches the prior's class logits


def _vat_reference(model, x_u):
    torch.manual_seed(5)  # the power iteration's random start, as in the loss
    return vat_loss(model.predict_logits, x_u, 0.1, 0.2 * math.sqrt(x_u[0].numel()),
                    logits_BK=model.predict_logits(x_u))


def _consistency_reference(model, x_u):
    torch.manual_seed(5)  # the input noise, as in the loss
    return pi_loss(model.predict_logits(x_u), model.predict_logits(x_u + 0.5 * torch.randn_like(x_u)))


def _latent_vat_reference(model, x_u):
    """By hand: one power iteration in posterior-std units u (z = mu + std * u), then KL at |u| = 0.5."""
    mu, logvar = model.encoder(x_u)
    std = torch.exp(0.5 * logvar)
    p = torch.softmax(model.prior(mu), -1).detach()

    def kl(u):
        return (p * (p.log() - torch.log_softmax(model.prior(mu + std * u), -1))).sum(-1).mean()

    torch.manual_seed(5)  # the power iteration's random start, as in the loss
    d = torch.randn_like(mu)
    d = (0.1 * d / d.norm(dim=1, keepdim=True)).requires_grad_(True)
    (grad,) = torch.autograd.grad(kl(d), d)
    return kl(0.5 * grad / grad.norm(dim=1, keepdim=True))


# The optional terms on ours' classifier f(mu(x)) over the unlabelled batch (none is the paper's): the config
# that turns one on, the output key it is logged under, its weight, and the term computed by hand.
CLASSIFIER_TERMS = {
    "vat": (dict(vat_weight=10.0, vat_xi=0.1, vat_eps=0.2), "vat", 10.0, _vat_reference),
    "consistency": (dict(consistency_weight=100.0, consistency_noise=0.5), "consistency", 100.0,
                    _consistency_reference),
    "entmin": (dict(entmin_weight=2.0), "entropy", 2.0, lambda model, x_u: entropy_loss(model.predict_logits(x_u))),
    "latent_vat": (dict(latent_vat_weight=3.0, latent_vat_eps=0.5, vat_xi=0.1), "latent_vat", 3.0,
                   _latent_vat_reference),
}


@pytest.mark.parametrize("term_name", list(CLASSIFIER_TERMS))
def test_classifier_term(term_name):
    """loss = paper loss + weight * term, where the term is VAT's KL(p(y|x_u) || p(y|x_u + r_adv)), the Π-model's
    mean (softmax f(mu(x_u)) - softmax f(mu(x_u + n)))^2, the mean entropy of softmax f(mu(x_u)) or VAT's KL in
    the latent space, KL(softmax f(mu) || softmax f(mu + std * r_adv)), with
    p = softmax f(mu(x)); each term trains encoder and prior, never the generator."""
    settings, key, weight, reference = CLASSIFIER_TERMS[term_name]
    data = batch(make("mlp+mlp gaussian"), n_u=16)
    eps = torch.randn(16 + 3, 6)  # tiny nets: z_dim 6
    plain = make("mlp+mlp gaussian")(*data, eps=eps)
    model = make("mlp+mlp gaussian", **settings)
    torch.manual_seed(5)
    out = model(*data, eps=eps)
    term = reference(model, data[0])
    assert plain[key] == 0 and out[key] > 0
    torch.testing.assert_close(out[key], term.detach())
    torch.testing.assert_close(out["loss"], plain["loss"] + weight * out[key])
    term.backward()
    assert all(p.grad is None for p in model.generator.parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.prior.parameters())


def test_pseudo_label_term():
    """model.pseudo_label_weight: loss = the rest + weight * mean_B w_b CE(f(mu(x_b)), argmax q_b), q the teacher's
    reading of (mu, softmax f(mu)) taken without gradient, w_b = 1 - H(q_b) / log K; no teacher, no term."""
    data = batch(make("mlp+mlp gaussian"), n_u=16)
    eps = torch.randn(16 + 3, 6)  # tiny nets: z_dim 6
    model = make("mlp+mlp gaussian", graph_smoothing=0.9, pseudo_label_weight=4.0)
    plain = model(*data, eps=eps)
    assert plain["pseudo"] == 0
    seen = {}

    def teacher(mu_BZ, p_BK):  # sure of class 1 on the first half of the rows, uniform on the rest
        seen.update(mu=mu_BZ, p=p_BK)
        q_BK = torch.full_like(p_BK, 1 / 3)
        q_BK[:8] = torch.tensor([0.0, 1.0, 0.0])
        return q_BK

    out = model(*data, eps=eps, teacher=teacher)
    assert not seen["mu"].requires_grad and not seen["p"].requires_grad
    mu = model.encoder(data[0])[0]
    torch.testing.assert_close(seen["mu"], mu.detach())
    logits = model.prior(mu)
    expected = torch.nn.functional.cross_entropy(logits[:8], torch.ones(8, dtype=torch.long), reduction="sum") / 16
    torch.testing.assert_close(out["pseudo"], expected.detach())
    torch.testing.assert_close(out["loss"], plain["loss"] + 4.0 * out["pseudo"])
    uniform = pseudo_label_loss(logits, mu, lambda m, p: torch.full_like(p, 1 / 3))
    assert uniform == 0  # a reading with no certainty teaches nothing
    model.zero_grad()
    pseudo_label_loss(logits, mu, teacher).backward()
    assert all(p.grad is None for p in model.generator.parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.prior.parameters())


@pytest.mark.parametrize("name", [n for n in PAIRINGS if n.startswith("wrn")])
def test_channels_last_gives_the_same_loss_and_gradients(name):
    """The training loop puts image nets and batches in channels_last on GPU; the math must not change."""
    model = make(name)
    x_u, x_l, y_l, z_neg = batch(model)
    eps = torch.randn(x_u.shape[0] + x_l.shape[0], model.cfg.z_dim)
    ref = model(x_u, x_l, y_l, z_neg, eps=eps)["loss"]
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model = model.to(memory_format=torch.channels_last)
    cl = lambda x: x.contiguous(memory_format=torch.channels_last)  # noqa: E731
    loss = model(cl(x_u), cl(x_l), y_l, z_neg, eps=eps)["loss"]
    loss.backward()
    torch.testing.assert_close(loss, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-4, msg=n)
