"""launch/export_tables.py and configs/outside/: a bundled table written as CSV and read by the shared defaults'
config as any user's CSV; every suite's configs load; a missing package is one line."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO
from shards.make import ensure
from ssl_ebm.config import load_config
from ssl_ebm.data import read_manifest

sys.path.insert(0, str(REPO / "launch"))

import export_tables  # noqa: E402  (launch/export_tables.py)
import reproduce  # noqa: E402  (launch/reproduce.py)


def test_breast_cancer_exports_and_builds_with_its_outside_config(tmp_path):
    (path,) = export_tables.export(["breast_cancer"], tmp_path / "csv")
    frame = pd.read_csv(path)
    assert frame.shape == (569, 31) and frame.columns[-1] == "label" and sorted(frame.label.unique()) == [0, 1]
    assert not list((tmp_path / "csv").glob("*.tmp"))
    cfg = load_config(str(REPO / "configs" / "outside" / "breast_cancer.yaml"),
                      [f"data.shards={tmp_path / 'shards'}", f"data.source={path}"])
    m = read_manifest(ensure(cfg.data))
    assert m["x_shape"] == [30] and m["class_names"] == ["0", "1"]
    assert m["splits"]["labelled"]["class_counts"] == [10, 10]
    assert sum(info["count"] for info in m["splits"].values()) == 569
    assert np.isclose(m["splits"]["test"]["count"] / 569, 0.2, atol=0.01)


def test_a_missing_package_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "river", None)  # import river -> ImportError
    with pytest.raises(SystemExit, match="pip install river"):
        export_tables.export(["segment"], tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(SystemExit):
        export_tables.main(["no_such_table", "--out", str(tmp_path)])


def test_every_suite_config_exists_loads_and_keeps_the_shared_defaults():
    """The outside tables are a user's tables on the shared defaults (that their configs name data, label count
    and run folder only is test_reproduce's test_every_tabular_config_names_only_its_data_and_label_count)."""
    shared = load_config(str(REPO / "configs" / "tabular.yaml"))
    for suite, configs in reproduce.SUITES.items():
        for rel in configs:
            path = REPO / rel
            cfg = load_config(str(path))
            assert cfg.model == shared.model and cfg.optim == shared.optim and cfg.sampler == shared.sampler, rel
            raw = yaml.safe_load(path.read_text())
            if suite == "outside":
                assert raw["data"]["source"] == f"data_cache/outside/{path.stem}.csv"
                assert path.stem in export_tables.TABLES
    assert set(export_tables.TABLES) == {c.split("/")[-1][:-5] for c in reproduce.SUITES["outside"]}
