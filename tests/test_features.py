"""ssl_ebm/features.py: standard and quantile (rank-Gauss) scaling, in the shards, the API and ensure()."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from sklearn.datasets import load_digits

from shards.make import build, ensure
from ssl_ebm import api, features
from ssl_ebm import config as C
from ssl_ebm.data import eval_batches
from ssl_ebm.model import LatentEBM
from ssl_ebm.shard_format import DataError


def skewed(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    x = np.c_[rng.exponential(size=n) ** 3,  # a long right tail
              (rng.random(n) < 0.6) * rng.exponential(size=n),  # 40% ties at 0
              rng.normal(size=n)]
    x[:40, 0] = -999.0  # a sentinel for "missing"
    return x


def test_quantile_gives_unit_variance_bounded_features_where_standard_leaves_outliers():
    x = skewed()
    q, s = features.fit(x, "quantile"), features.fit(x, "standard")
    zq, zs = features.to_model(x, q), features.to_model(x, s)
    np.testing.assert_allclose(zq.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(zq.std(0), 1, atol=1e-4)
    assert np.abs(zq).max() < 4.0  # the CDF is clipped at 0.5 / 256 from either end
    assert np.abs(zs[:, 0]).max() > 9.0  # the sentinel, standardised, sits ten deviations out
    ties = zq[x[:, 1] == 0, 1]
    assert np.ptp(ties) == 0 and -1.5 < ties[0] < -0.5  # every tie at one value, mid-way in its CDF range
    # a normal feature keeps its order and, up to the grid, its shape
    assert np.corrcoef(zq[:, 2], x[:, 2])[0, 1] > 0.999
    # beyond the training range: the edges, never further out
    far = features.to_model(np.array([[1e12, -1e12, 50.0]]), q)
    assert far[0, 0] == pytest.approx(zq[:, 0].max(), abs=1e-4) and far[0, 1] == pytest.approx(zq[:, 1].min(), abs=1e-4)


def test_to_data_inverts_to_model():
    x = skewed()
    q, s = features.fit(x, "quantile"), features.fit(x, "standard")
    np.testing.assert_allclose(features.to_data(features.to_model(x, s), s), x, rtol=1e-5, atol=1e-4)
    back = features.to_data(features.to_model(x, q), q)
    # exact at the stored quantiles, within the grid elsewhere: the median error is tiny
    assert np.median(np.abs(back - x)) < 1e-3
    levels_at = np.asarray(q["quantiles"])[:, 1:-1].T
    np.testing.assert_allclose(features.to_data(features.to_model(levels_at, q), q), levels_at, rtol=1e-4, atol=1e-2)


def test_an_old_record_is_standard_and_a_bad_method_is_refused():
    x = skewed()
    s = features.fit(x, "standard")
    old = {k: s[k] for k in ("mean", "std", "from")}  # manifests written before "method" existed
    np.testing.assert_array_equal(features.to_model(x, old), features.to_model(x, s))
    with pytest.raises(ValueError, match="unknown feature scaling 'rank'"):
        features.fit(x, "rank")


def test_quantile_shards_the_api_and_ensure_agree(tmp_path):
    url = str(tmp_path / "q")
    proc = subprocess.run([sys.executable, "-m", "shards.make", "--dataset", "digits", "--out", url,
                           "--num-labelled", "50", "--features", "quantile", "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((Path(url) / "manifest.json").read_text())
    norm = manifest["normalisation"]
    assert norm["method"] == "quantile" and len(norm["quantiles"]) == 64 and len(norm["levels"]) == 256
    # the stored test vectors are the API's own scaling of the source rows
    stored = torch.cat([b["x"] for b in eval_batches(url, "test", batch_size=1000)])
    raw = load_digits().data[manifest["split_indices"]["test"]]
    cfg = C.from_dict(C.Config, {"model": {"x_shape": [64], "z_dim": 4, "hidden": 16, "prior_hidden": 16,
                                           "num_classes": 10}})
    model = api.Model(LatentEBM(cfg.model).eval(), cfg, manifest)
    torch.testing.assert_close(model.to_model_units(raw), stored)
    # and undone to the data's units (pixel counts 0..16): to within half a count inside the training
    # range, and to the training extremes beyond it (a few test pixels are brighter than any training one)
    q = np.asarray(norm["quantiles"])
    clipped = np.clip(raw, q[:, 0], q[:, -1])
    assert (clipped != raw).sum() < 20
    assert np.abs(model.to_data_units(stored).numpy() - clipped).max() < 0.5
    with pytest.raises(api.ModelError, match="NaN or infinite"):
        model.to_model_units(np.where(np.arange(64) == 3, np.inf, raw[:2]))
    # a config that asks for other features than the shards hold is one error naming both
    data = C.DataConfig(shards=url, dataset="digits", num_labelled=50)
    with pytest.raises(DataError, match=r"built with features 'quantile', but data.features is 'standard'"):
        ensure(data)
    assert ensure(C.DataConfig(shards=url, dataset="digits", num_labelled=50, features="quantile")) == url
    # an unknown value is refused by the config and by the builder
    with pytest.raises(Exception, match="data.features"):
        C.DataConfig(features="rank")
    with pytest.raises(DataError, match="build option features='rank'"):
        build("digits", str(tmp_path / "r"), features="rank")
