"""Small convolutional encoder q(z|x) for 28x28 and 32x32 images, sized for a CPU.

Three strided convolutions (DCGAN-discriminator-like), leaky ReLU 0.2, then a linear head on the
flattened feature map to (mu, logvar):
    C x 28 x 28 -> c x 14 x 14 -> 2c x 7 x 7 -> 4c x 5 x 5   (32 x 32: 16, 8, 6)
with c = conv_channels: 4x4 stride-2 kernels, then a 3x3 unpadded one. About 3.5M multiply-adds
per 28x28 image at c = 32, against about 9M for WRN-10-1 (16 channels at full resolution); see
configs/mnist.yaml for the measured step times. BatchNorm after the second and third convolution
(model.conv_batchnorm) is optional: it normalises over the mixed batch of unlabelled and labelled
images, as the WRN does.

Shapes: B batch, C channels, H x W image, Z latent dim.
"""

import torch
from torch import nn

from ssl_ebm.config import ModelConfig
from ssl_ebm.nets.layers import LEAKY_SLOPE, gaussian_head, xavier_init


class ConvEncoder(nn.Module):
    """x_BCHW -> (mu_BZ, logvar_BZ)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c, (channels, size) = cfg.conv_channels, cfg.x_shape[:2]

        def norm(n: int) -> nn.Module:
            return nn.BatchNorm2d(n) if cfg.conv_batchnorm else nn.Identity()

        self.features = nn.Sequential(
            nn.Conv2d(channels, c, 4, 2, 1), nn.LeakyReLU(LEAKY_SLOPE),
            nn.Conv2d(c, 2 * c, 4, 2, 1), norm(2 * c), nn.LeakyReLU(LEAKY_SLOPE),
            nn.Conv2d(2 * c, 4 * c, 3, 1, 0), norm(4 * c), nn.LeakyReLU(LEAKY_SLOPE),
        )
        side = size // 4 - 2  # 28 -> 5, 32 -> 6
        self.head = nn.Linear(4 * c * side * side, 2 * cfg.z_dim)
        xavier_init(self)

    def forward(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return gaussian_head(self.head(self.features(x_BCHW).flatten(1)))
