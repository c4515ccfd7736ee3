"""The three networks: encoder q(z|x), generator p(x|z), and the latent EBM prior f(z).

Each family is one builder behind a small registry keyed by the config's names.
"""

from torch import nn

from ssl_ebm.config import ENCODERS, GENERATORS, ModelConfig
from ssl_ebm.nets.conv import ConvEncoder
from ssl_ebm.nets.deconv import DeconvGenerator
from ssl_ebm.nets.mlp import MLPEncoder, MLPGenerator
from ssl_ebm.nets.prior import Prior
from ssl_ebm.nets.wrn import WideResNet

ENCODER_REGISTRY = {"wrn": WideResNet, "conv": ConvEncoder, "mlp": MLPEncoder}
GENERATOR_REGISTRY = {"deconv": DeconvGenerator, "mlp": MLPGenerator}
assert set(ENCODER_REGISTRY) == set(ENCODERS) and set(GENERATOR_REGISTRY) == set(GENERATORS)


def build_encoder(cfg: ModelConfig) -> nn.Module:
    """q(z|x): forward(x) -> (mu_BZ, logvar_BZ)."""
    return ENCODER_REGISTRY[cfg.encoder](cfg)


def build_generator(cfg: ModelConfig) -> nn.Module:
    """p(x|z): forward(z_BZ) -> the likelihood's parameter, shape (B, *x_shape)."""
    return GENERATOR_REGISTRY[cfg.generator](cfg)


__all__ = ["build_encoder", "build_generator", "Prior"]
