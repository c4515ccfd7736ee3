"""The latent EBM prior with symbol-vector coupling (paper, sec. 2.1, eqs. 2-5).

Sign convention, used everywhere in ssl_ebm: f(z) gives the K logits, and
    F(z) = logsumexp_y f_y(z)                                   (eq. 5)
is the NEGATIVE energy (the "free energy" with the sign that makes larger = more probable):
    log p_alpha(z) = F(z) - |z|^2 / (2 sigma0^2) + const        (eq. 4, p0 = N(0, sigma0^2 I))
    p_alpha(y | z) = softmax(f(z))_y                            (eq. 3)

The prior always runs in fp32, also inside a bf16 autocast region: it is tiny, and the learning
signal is a difference of energies (eq. 10) that bf16 would round away.

Shapes: B batch, Z latent dim, K classes.
"""

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from ssl_ebm.config import ModelConfig
from ssl_ebm.nets.layers import xavier_init
from ssl_ebm.nets.mlp import mlp3


class Prior(nn.Module):
    """f(z): a 3-layer MLP z -> prior_hidden -> prior_hidden -> K logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.z_dim = cfg.z_dim
        self.num_classes = cfg.num_classes
        self.net = xavier_init(mlp3(cfg.z_dim, cfg.prior_hidden, cfg.num_classes, cfg.prior_activation))
        if cfg.prior_spectral_norm:
            for i, layer in enumerate(self.net):
                if isinstance(layer, nn.Linear):
                    self.net[i] = spectral_norm(layer)

    def forward(self, z_BZ: torch.Tensor) -> torch.Tensor:
        """The K logits f(z), fp32."""
        with torch.autocast(device_type=z_BZ.device.type, enabled=False):
            return self.net(z_BZ.float())

    def free_energy(self, z_BZ: torch.Tensor) -> torch.Tensor:
        """F(z) = logsumexp f(z) (eq. 5), shape (B,), fp32."""
        return torch.logsumexp(self(z_BZ), dim=-1)
