"""Wide-ResNet WRN-d-k encoder q(z|x) for 28x28 and 32x32 images (Zagoruyko & Komodakis 2016).

The pre-activation (BN -> leaky ReLU 0.1 -> conv) layout used by the standard SSL WRN-28-2
(MixMatch / FixMatch), with one fix: when a block changes width, both the residual branch and the
1x1 projection shortcut read the *activated* input, as in the original WRN. (The popular PyTorch
port feeds the raw input to conv1 in that case, which leaves that block's first BN unused.)
Three groups of (d - 4) / 6 blocks with 16k, 32k, 64k channels, strides 1, 2, 2; then BN, activation,
global average pooling and a linear head to (mu, logvar), 2Z numbers.

Shapes: B batch, C channels, H x W image, Z latent dim.
"""

import torch
from torch import nn

from ssl_ebm.config import ModelConfig
from ssl_ebm.nets.layers import gaussian_head, xavier_init

WRN_SLOPE = 0.1  # leaky ReLU slope of the SSL WRN
# Standard SSL code uses 0.001 (TF's decay 0.999) for ~1M steps; 0.01 settles within a few hundred.
BN_MOMENTUM = 0.01


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, momentum=BN_MOMENTUM)


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = _bn(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = _bn(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.act = nn.LeakyReLU(WRN_SLOPE)
        same = c_in == c_out and stride == 1
        self.shortcut = None if same else nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        a_BCHW = self.act(self.bn1(x_BCHW))
        skip = x_BCHW if self.shortcut is None else self.shortcut(a_BCHW)
        return skip + self.conv2(self.act(self.bn2(self.conv1(a_BCHW))))


class WideResNet(nn.Module):
    """x_BCHW -> (mu_BZ, logvar_BZ)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n = (cfg.wrn_depth - 4) // 6  # blocks per group (config checks depth = 6n + 4)
        widths = [16, 16 * cfg.wrn_width, 32 * cfg.wrn_width, 64 * cfg.wrn_width]
        self.stem = nn.Conv2d(cfg.x_shape[0], widths[0], 3, 1, 1, bias=False)
        blocks = []
        for g, stride in enumerate((1, 2, 2)):
            for i in range(n):
                blocks.append(_Block(widths[g] if i == 0 else widths[g + 1], widths[g + 1], stride if i == 0 else 1))
        self.blocks = nn.Sequential(*blocks)
        self.bn = _bn(widths[3])
        self.act = nn.LeakyReLU(WRN_SLOPE)
        self.head = nn.Linear(widths[3], 2 * cfg.z_dim)
        xavier_init(self)

    def forward(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.act(self.bn(self.blocks(self.stem(x_BCHW))))
        return gaussian_head(self.head(h.mean(dim=(2, 3))))
