"""3-layer MLP encoder q(z|x) and generator p(x|z) for vectors (text and tabular experiments).

Shapes: B batch, D = prod(x_shape) data dim, Z latent dim.
"""

import math

import torch
from torch import nn

from ssl_ebm.config import ModelConfig
from ssl_ebm.nets.layers import gaussian_head, make_activation, xavier_init


def mlp3(d_in: int, hidden: int, d_out: int, activation: str) -> nn.Sequential:
    """d_in -> hidden -> hidden -> d_out, with the activation between layers and none at the end."""
    return nn.Sequential(
        nn.Linear(d_in, hidden), make_activation(activation),
        nn.Linear(hidden, hidden), make_activation(activation),
        nn.Linear(hidden, d_out),
    )


class MLPEncoder(nn.Module):
    """x -> (mu, logvar) of q(z|x). Image-shaped inputs are flattened."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.net = xavier_init(mlp3(math.prod(cfg.x_shape), cfg.hidden, 2 * cfg.z_dim, cfg.activation))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return gaussian_head(self.net(x.flatten(1)))


class MLPGenerator(nn.Module):
    """z -> g(z) of shape (B, *x_shape): the Gaussian mean, or the V word logits (multinomial).

    No output squashing: the likelihood decides what the output means.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.x_shape = cfg.x_shape
        self.net = xavier_init(mlp3(cfg.z_dim, cfg.hidden, math.prod(cfg.x_shape), cfg.activation))

    def forward(self, z_BZ: torch.Tensor) -> torch.Tensor:
        return self.net(z_BZ).view(z_BZ.shape[0], *self.x_shape)
