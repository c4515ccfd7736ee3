"""ssl-ebm: shards -> loader -> encoder q(z|x) -> latent EBM prior f(z) + Langevin chains -> generator p(x|z) -> losses -> step -> checkpoint."""

__version__ = "0.1.0"
