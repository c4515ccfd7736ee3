"""ssl-ebm: shards -> loader -> encoder q(z|x) -> latent EBM prior f(z) + Langevin chains -> generator p(x|z) -> losses -> step -> checkpoint.

A trained model: `ssl_ebm.load(url)` (ssl_ebm/api.py) predicts, encodes, samples, generates and scores;
`ssl_ebm.export(model, url)` writes it as config + manifest + model.safetensors.
"""

__version__ = "0.1.0"

_API = ("load", "export", "Model", "ModelError", "PickleRefused")


def __getattr__(name: str):
    # Imported on first use: `import ssl_ebm.config` stays free of the model code.
    if name in _API:
        from ssl_ebm import api

        return getattr(api, name)
    raise AttributeError(f"module 'ssl_ebm' has no attribute {name!r}")
