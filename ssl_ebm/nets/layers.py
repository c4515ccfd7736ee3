"""Pieces shared by the nets: activations, Xavier-normal init, the Gaussian head of q(z|x).

Shapes: B batch, Z latent dim.
"""

import torch
from torch import nn

LEAKY_SLOPE = 0.2  # slope of "leaky_relu" (as in the authors' latent-EBM code)
LOGVAR_BOUND = 10.0  # |log-variance| of q(z|x) is softly kept below this (std in [7e-3, 150])


def make_activation(name: str) -> nn.Module:
    """One of config.ACTIVATIONS as a module (the config has already checked the name)."""
    return {
        "gelu": nn.GELU,
        "relu": nn.ReLU,
        "leaky_relu": lambda: nn.LeakyReLU(LEAKY_SLOPE),
        "elu": nn.ELU,
        "silu": nn.SiLU,
        "tanh": nn.Tanh,
    }[name]()


def xavier_init(module: nn.Module) -> nn.Module:
    """Xavier-normal weights and zero biases for every linear and (transposed) conv layer (paper, sec. 5)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def gaussian_head(h_B2Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a (B, 2Z) head output into the mean and log-variance of q(z|x).

    The log-variance goes through LOGVAR_BOUND * tanh(. / LOGVAR_BOUND): the identity near 0, but it
    cannot reach exp(+-inf), which otherwise turns a bad step into NaNs in the KL and in z+.
    """
    mu_BZ, raw_BZ = h_B2Z.chunk(2, dim=-1)
    logvar_BZ = LOGVAR_BOUND * torch.tanh(raw_BZ / LOGVAR_BOUND)
    return mu_BZ, logvar_BZ
