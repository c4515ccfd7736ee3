"""Feature scaling of vector datasets: fitted on the training pool when shards are built (shards/make.py),
stored in the manifest's "normalisation", applied to new inputs by the Python API and undone for what
the generator produces. Before it, a table's rows become vectors (fit_columns / encode_columns, at the
end: missing numbers imputed, categorical columns one-hot), by a record stored as the manifest's "columns".

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

Only some columns may be scaled: a table's one-hot blocks and 0/1 "is missing" indicators are already in
the units a categorical likelihood wants, and standardising them would turn a 0/1 code into values that
depend on how rare the category is. `fit(..., columns=[...])` scales those columns only and records them
as "columns"; the others pass through to_model and to_data unchanged. Without "columns", every column is
scaled (every manifest written before tables had categorical columns).
"""

from __future__ import annotations

import numpy as np
from scipy import special

from ssl_ebm.config import FEATURE_SCALINGS as METHODS
from ssl_ebm.shard_format import DataError

LEVELS = 256  # quantile levels stored per feature (fewer when the training pool is smaller)


def fit(train_ND: np.ndarray, method: str, columns: list[int] | None = None) -> dict:
    """The normalisation record of `method` for training rows (N, D), as stored in the manifest.
    `columns`: the column indices to scale (None = all); the others pass through unchanged."""
    if method not in METHODS:
        raise ValueError(f"unknown feature scaling {method!r}; use one of {', '.join(METHODS)}")
    train_ND = np.asarray(train_ND, dtype=np.float64)
    norm: dict = {"method": method, "from": "labelled + unlabelled (the training pool)"}
    if columns is not None:
        norm["columns"] = [int(c) for c in columns]
        train_ND = train_ND[:, norm["columns"]]
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
    return _on_columns(x_ND, norm, _scale).astype(np.float32)


def to_data(x_ND: np.ndarray, norm: dict) -> np.ndarray:
    """Model units -> data units (float64): the inverse of to_model, up to the quantile grid's resolution."""
    x_ND = np.asarray(x_ND, dtype=np.float64)
    if not norm or "mean" not in norm:
        return x_ND
    return _on_columns(x_ND, norm, _unscale)


def _on_columns(x_ND: np.ndarray, norm: dict, f) -> np.ndarray:
    """f applied to the scaled columns of x (all of them without a "columns" record), the rest unchanged."""
    if "columns" not in norm:
        return f(x_ND, norm)
    last = max(norm["columns"], default=-1)
    if x_ND.ndim != 2 or x_ND.shape[1] <= last:
        raise ValueError(f"x has shape {x_ND.shape}; the normalisation scales columns up to {last}")
    out = x_ND.copy()
    out[:, norm["columns"]] = f(x_ND[:, norm["columns"]], norm)
    return out


def _scale(x_ND: np.ndarray, norm: dict) -> np.ndarray:
    if norm.get("method", "standard") == "quantile":
        x_ND = _rank_gauss(x_ND, norm)
    return (x_ND - np.asarray(norm["mean"])) / np.asarray(norm["std"])


def _unscale(x_ND: np.ndarray, norm: dict) -> np.ndarray:
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


# ----------------------------------------------------------------------------- tables: missing values, categories

MISSING = "(missing)"  # the category of a missing categorical value
UNSEEN = "(unseen)"  # the reserved last slot of every categorical block: a value the training pool lacks


def category_name(value) -> str:
    """A categorical value's name, as the table reader (shards/sources.py) and the API (api.category_names) both
    give it: its text, an integral float without '.0' (a code column with missing values reads as floats)."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def fit_columns(numeric_ND: np.ndarray, categorical_NC: np.ndarray | None, numeric_names: list[str],
                categorical_names: list[str]) -> dict:
    """The column record of a table, fitted on the training pool's rows (stored as the manifest's "columns").

    Numeric columns (N, D; NaN = missing) keep their place; each gets the pool's median, which a missing
    value becomes, and, if the pool has missing values in it, a 0/1 "is missing" indicator column after
    the D numeric ones. Each categorical column (N, C of str, None = missing) becomes a one-hot block after
    those: its categories are the values the pool has, sorted, a missing value being the category
    "(missing)"; the block's last slot, "(unseen)", takes what the pool never had (a new category in the
    test part). Only the D numeric columns are later scaled (fit(..., columns=scaled_columns(record))).
    """
    numeric_ND = np.asarray(numeric_ND, dtype=np.float64)
    width = numeric_ND.shape[1]
    numeric = []
    for j, name in enumerate(numeric_names):
        missing = np.isnan(numeric_ND[:, j])
        if missing.all():
            raise DataError(f"column {name!r} has no value in the training pool ({len(missing)} rows, all missing)")
        indicator = None
        if missing.any():
            indicator, width = width, width + 1
        numeric.append({"name": name, "column": j, "median": float(np.median(numeric_ND[~missing, j])),
                        "missing_indicator": indicator})
    blocks = []
    for j, name in enumerate(categorical_names):
        categories = sorted({MISSING if v is None else str(v) for v in categorical_NC[:, j]}) + [UNSEEN]
        blocks.append({"name": name, "start": width, "size": len(categories), "categories": categories})
        width += len(categories)
    names = [*numeric_names, *(f"{c['name']} is missing" for c in numeric if c["missing_indicator"] is not None),
             *(f"{b['name']}={c}" for b in blocks for c in b["categories"])]
    return {"numeric": numeric, "categorical": blocks, "width": width, "feature_names": names,
            "from": "labelled + unlabelled (the training pool)"}


def scaled_columns(record: dict) -> list[int]:
    """The columns that feature scaling applies to: the numeric ones, not indicators or one-hot blocks."""
    return [c["column"] for c in record["numeric"]]


def encode_columns(numeric_ND: np.ndarray, categorical_NC: np.ndarray | None, record: dict) -> np.ndarray:
    """Table rows -> (N, width) float64 by a fit_columns record: a missing number -> the median, with 1 in its
    indicator; each categorical value -> its one-hot block, a value the record lacks -> the "(unseen)" slot."""
    numeric_ND = np.asarray(numeric_ND, dtype=np.float64)
    n = len(numeric_ND)
    out_NW = np.zeros((n, record["width"]))
    for c in record["numeric"]:
        values = numeric_ND[:, c["column"]]
        missing = np.isnan(values)
        out_NW[:, c["column"]] = np.where(missing, c["median"], values)
        if c["missing_indicator"] is not None:
            out_NW[:, c["missing_indicator"]] = missing
    for j, block in enumerate(record["categorical"]):
        slot = {category: i for i, category in enumerate(block["categories"][:-1])}
        unseen = block["size"] - 1
        slots = np.array([slot.get(MISSING if v is None else str(v), unseen) for v in categorical_NC[:, j]], np.int64)
        out_NW[np.arange(n), block["start"] + slots] = 1.0
    return out_NW
