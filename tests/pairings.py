"""Tiny nets for every encoder / generator / likelihood pairing (WRN-10-1, 4-channel conv encoder, 4 base deconv channels)."""

from ssl_ebm.config import ModelConfig

PAIRINGS = {
    "wrn+deconv 1x28x28": dict(encoder="wrn", generator="deconv", x_shape=(1, 28, 28)),
    "wrn+deconv 3x32x32": dict(encoder="wrn", generator="deconv", x_shape=(3, 32, 32)),
    "conv+deconv 1x28x28": dict(encoder="conv", generator="deconv", x_shape=(1, 28, 28)),
    "conv+deconv 3x32x32 no BN": dict(encoder="conv", generator="deconv", x_shape=(3, 32, 32), conv_batchnorm=False),
    "mlp+mlp gaussian": dict(encoder="mlp", generator="mlp", x_shape=(16,)),
    "mlp+mlp multinomial": dict(encoder="mlp", generator="mlp", likelihood="multinomial", x_shape=(30,)),
}
TINY_NETS = dict(z_dim=6, num_classes=3, hidden=16, prior_hidden=16, wrn_depth=10, wrn_width=1, conv_channels=4, gen_channels=4)


def tiny_config(name: str, **kw) -> ModelConfig:
    """The model config of pairing `name` with tiny nets; `kw` overrides any field."""
    return ModelConfig(**{**TINY_NETS, **PAIRINGS[name], **kw})
