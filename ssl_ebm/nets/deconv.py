"""4-layer deconvolutional generator p(x|z) for images, DCGAN-like (paper, sec. 5).

As in the authors' latent-EBM code: transposed convolutions with leaky ReLU 0.2, no normalisation
(so each example's likelihood depends on its own z only), tanh output for images in [-1, 1].
Widths 8c, 4c, 2c with c = gen_channels. Spatial sizes: 1 -> 4 -> 8 -> 16 -> 32, or for 28x28
1 -> 4 -> 7 -> 14 -> 28 (a 3x3 kernel in the second layer).

Shapes: B batch, Z latent dim, C channels, H x W image.
"""

import torch
from torch import nn

from ssl_ebm.config import DECONV_SIZES, ModelConfig
from ssl_ebm.nets.layers import LEAKY_SLOPE, xavier_init

_SECOND_KERNEL = {32: 4, 28: 3}  # (4 - 1) * 2 - 2 + k = 8 or 7
assert set(_SECOND_KERNEL) == set(DECONV_SIZES)


class DeconvGenerator(nn.Module):
    """z_BZ -> x_BCHW in [-1, 1]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        channels, size = cfg.x_shape[0], cfg.x_shape[1]  # config checks H = W in DECONV_SIZES
        c = cfg.gen_channels
        self.net = nn.Sequential(
            nn.ConvTranspose2d(cfg.z_dim, 8 * c, 4, 1, 0), nn.LeakyReLU(LEAKY_SLOPE),
            nn.ConvTranspose2d(8 * c, 4 * c, _SECOND_KERNEL[size], 2, 1), nn.LeakyReLU(LEAKY_SLOPE),
            nn.ConvTranspose2d(4 * c, 2 * c, 4, 2, 1), nn.LeakyReLU(LEAKY_SLOPE),
            nn.ConvTranspose2d(2 * c, channels, 4, 2, 1), nn.Tanh(),
        )
        xavier_init(self)

    def forward(self, z_BZ: torch.Tensor) -> torch.Tensor:
        return self.net(z_BZ[:, :, None, None])
