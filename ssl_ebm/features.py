"""Feature scaling of vector datasets: fitted on the training pool when shards are built (shards/make.py),
stored in the manifest's "normalisation", applied to new inputs by the Python API and undone for what
the generator produces.

Two methods (`data.features`, or `python -m shards.make --features`):
- "standard": (x - mean) / std per feature, the mean and std of the training pool.
- "quantile": each feature through the training pool's empirical CDF, then the standard normal's inverse
  CDF ("rank-Gauss"), then standardised. Skewed or heavy-tailed features (counts, sentinel values like
  -999, long right tails) come out as a bell of unit variance instead of a spike plus a few points ten
  standard deviations away. Ties (a feature that is 0 in most rows) map to the middle of their CDF range.
  Values outside the training range map as its extremes do, and the CDF is squeezed from [0, 1] into
  [0.5 / L, 1 - 0.5 / L] for L quantile levels, so every value is finite and none lands further out than
  the training pool's own.

A manifest without "method" (shards built before "quantile" existed) is "standard".
"""

from __future__ import annotations

import numpy as np
from scipy import special

from ssl_ebm.config import FEATURE_SCALINGS as METHODS
LEVELS = 256  # quantile levels stored per feature (fewer when the training pool is smaller)


def fit(train_ND: np.ndarray, method: str) -> dict:
    """The normalisation record of `method` for training rows (N, D), as stored in the manifest."""
    if method not in METHODS:
        raise ValueError(f"unknown feature scaling {method!r}; use one of {', '.join(METHODS)}")
    train_ND = np.asarray(train_ND, dtype=np.float64)
    norm: dict = {"method": method, "from": "labelled + unlabelled (the training pool)"}
    if method == "quantile":
        levels = np.linspace(0.0, 1.0, max(2, min(LEVELS, len(train_ND))))
        norm["levels"] = levels.tolist()
        norm["quantiles"] = np.quantile(train_ND, levels, axis=0).T.tolist()  # (D, L)
        train_ND = _rank_gauss(train_ND, norm)
    mean, std = train_ND.mean(0), train_ND.std(0)
    std = np.where(std > 1e-12, std, 1.0)  # constant features stay constant (0) instead of dividing by 0
    norm.update(mean=mean.tolist(), std=std.tolist())
    return norm


def to_model(x_ND: np.ndarray, norm: dict) -> np.ndarray:
    """Data units -> model units (float32), by the manifest's normalisation record."""
    x_ND = np.asarray(x_ND, dtype=np.float64)
    if not norm or "mean" not in norm:
        return x_ND.astype(np.float32)
    if norm.get("method", "standard") == "quantile":
        x_ND = _rank_gauss(x_ND, norm)
    return ((x_ND - np.asarray(norm["mean"])) / np.asarray(norm["std"])).astype(np.float32)


def to_data(x_ND: np.ndarray, norm: dict) -> np.ndarray:
    """Model units -> data units (float64): the inverse of to_model, up to the quantile grid's resolution."""
    x_ND = np.asarray(x_ND, dtype=np.float64)
    if not norm or "mean" not in norm:
        return x_ND
    x_ND = x_ND * np.asarray(norm["std"]) + np.asarray(norm["mean"])
    if norm.get("method", "standard") != "quantile":
        return x_ND
    levels = np.asarray(norm["levels"])
    edge = 0.5 / len(levels)
    u_ND = np.clip((special.ndtr(x_ND) - edge) / (1.0 - 2.0 * edge), 0.0, 1.0)
    return np.stack([np.interp(u_ND[:, j], levels, q) for j, q in enumerate(np.asarray(norm["quantiles"]))], axis=1)


def _rank_gauss(x_ND: np.ndarray, norm: dict) -> np.ndarray:
    levels = np.asarray(norm["levels"])
    quantiles_DL = np.asarray(norm["quantiles"])
    if x_ND.ndim != 2 or x_ND.shape[1] != len(quantiles_DL):
        raise ValueError(f"x has shape {x_ND.shape}; expected (N, {len(quantiles_DL)})")
    u_ND = np.empty_like(x_ND)
    for j, q in enumerate(quantiles_DL):
        x = np.clip(x_ND[:, j], q[0], q[-1])  # beyond the training range: as its extremes
        # Averaging the CDF read upwards and downwards puts a tied value (q repeats) mid-way in its range.
        up = np.interp(x, q, levels)
        down = np.interp(-x, -q[::-1], -levels[::-1])
        u_ND[:, j] = 0.5 * (up - down)
    edge = 0.5 / len(levels)
    return special.ndtri(edge + (1.0 - 2.0 * edge) * u_ND)  # [0, 1] -> [edge, 1 - edge]: finite, invertible
