"""The discriminative semi-supervised baselines of the paper's tables, on our encoder and prior head.

    Classifier        x -> logits: the config's encoder q(z|x) (its mean mu(x)) and the prior MLP f as
                      the classification head, so a baseline sees exactly our networks (vectors and images)
    vat_loss          virtual adversarial training (Miyato et al. 2018): KL(p(y|x) || p(y|x + r_adv)),
                      r_adv from one power iteration
    entropy_loss      entropy minimisation (the optional "VAT + EntMin" term)
    pi_loss           the Pi-model (Laine & Aila 2017): squared difference of the softmax of two
                      stochastic passes (input noise + dropout)
    rampup            the Pi-model's exp(-5 (1 - t)^2) ramp of the unsupervised weight

Pure torch: no files, no printing, no distributed code. The training loop is launch/baselines.py.

Shapes: B batch, K classes, Z latent dim; x is (B, *x_shape).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssl_ebm.config import ModelConfig
from ssl_ebm.nets import Prior, build_encoder


class Classifier(nn.Module):
    """logits_BK = f(dropout(mu(x + noise))): our encoder's mean and the prior MLP f as the head.

    `input_noise` (std of Gaussian noise added to x) and `dropout` (on mu before f) act in train mode
    only; they are the Pi-model's stochastic augmentation and are 0 for the other baselines.
    """

    def __init__(self, cfg: ModelConfig, input_noise: float = 0.0, dropout: float = 0.0):
        super().__init__()
        if input_noise < 0 or not 0 <= dropout < 1:
            raise ValueError(f"input_noise must be >= 0 and dropout in [0, 1); got {input_noise}, {dropout}")
        self.encoder = build_encoder(cfg)
        self.prior = Prior(cfg)
        self.input_noise = input_noise
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.input_noise > 0:
            x = x + self.input_noise * torch.randn_like(x)
        mu_BZ, _ = self.encoder(x)
        return self.prior(self.dropout(mu_BZ.float()))


def _unit(d: torch.Tensor) -> torch.Tensor:
    """Each example's perturbation scaled to unit L2 norm over all its dimensions."""
    norm = d.flatten(1).norm(dim=1).clamp_min(1e-12)
    return d / norm.view(-1, *([1] * (d.dim() - 1)))


def kl_logits(p_logits_BK: torch.Tensor, q_logits_BK: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of KL(softmax(p) || softmax(q))."""
    p_log = F.log_softmax(p_logits_BK, dim=-1)
    return (p_log.exp() * (p_log - F.log_softmax(q_logits_BK, dim=-1))).sum(-1).mean()


def vat_perturbation(model: nn.Module, x: torch.Tensor, logits_BK: torch.Tensor, xi: float, eps: float,
                     power_iterations: int = 1) -> torch.Tensor:
    """r_adv (shape of x, norm eps per example): the direction that most increases the KL, by power iteration.

    d starts random; each iteration takes the gradient of KL(p(y|x) || p(y|x + xi d)) with respect to d
    (Miyato et al., eq. 9). The model's parameters get no gradient from this.
    """
    target = logits_BK.detach()
    d = _unit(torch.randn_like(x))
    for _ in range(power_iterations):
        d.requires_grad_(True)
        dist = kl_logits(target, model(x + xi * d))
        (grad,) = torch.autograd.grad(dist, d)
        d = _unit(grad.detach())
    return eps * d


def vat_loss(model: nn.Module, x: torch.Tensor, xi: float, eps: float, logits_BK: torch.Tensor | None = None,
             power_iterations: int = 1) -> torch.Tensor:
    """The local distributional smoothness term KL(p(y|x) || p(y|x + r_adv)), p(y|x) held fixed."""
    if logits_BK is None:
        with torch.no_grad():
            logits_BK = model(x)
    r_adv = vat_perturbation(model, x, logits_BK, xi, eps, power_iterations)
    return kl_logits(logits_BK.detach(), model(x + r_adv))


def entropy_loss(logits_BK: torch.Tensor) -> torch.Tensor:
    """Mean entropy of softmax(logits): minimising it pushes decision boundaries away from the data."""
    log_p = F.log_softmax(logits_BK, dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def pi_loss(logits_a_BK: torch.Tensor, logits_b_BK: torch.Tensor) -> torch.Tensor:
    """Pi-model consistency: mean over batch and classes of (softmax(a) - softmax(b))^2 (Laine & Aila, eq. 1)."""
    return (F.softmax(logits_a_BK, dim=-1) - F.softmax(logits_b_BK, dim=-1)).pow(2).mean()


def rampup(step: int, length: int) -> float:
    """exp(-5 (1 - t)^2) for t = step / length, then 1 (Laine & Aila's ramp-up of the unsupervised weight)."""
    if length <= 0 or step >= length:
        return 1.0
    t = max(step, 0) / length
    return math.exp(-5.0 * (1.0 - t) ** 2)
