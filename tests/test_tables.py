"""Tables as users have them (shards/sources.py read_table, ssl_ebm/features.py fit_columns): string columns
one-hot encoded with categories from the training pool, missing values imputed or their own category, the
separator found, options reachable from the training config, and one clear line for what cannot be used."""

from __future__ import annotations

import csv
import gzip
import io
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, SHARED_DATA, run_train
from shard_files import read_split
from shards.make import build, ensure
from ssl_ebm import features
from ssl_ebm.config import ConfigError, DataConfig, load_config
from ssl_ebm.data import SPLITS, DataError, read_manifest

JOBS = ["admin", "blue", "tech"]


def write_csv(path: Path, rows: list[list], header: list[str], sep: str = ";") -> Path:
    """A CSV as spreadsheets and R write it: a header, strings quoted, `sep` between fields; gzipped for .gz."""
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=sep, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    text = buf.getvalue().replace('""', "")  # an empty cell, not an empty quoted string
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def bank_like(n: int, seed: int, jobs=JOBS) -> list[list]:
    """Rows of age (some empty), income (some 'unknown'), job (some 'unknown'), city and the label y."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        age = "" if i % 9 == 4 else int(rng.integers(20, 70))
        income = "unknown" if i % 11 == 5 else round(float(rng.normal(1000, 300)), 2)
        job = "unknown" if i % 7 == 3 else jobs[int(rng.integers(len(jobs)))]
        rows.append([age, income, job, ["north", "south"][i % 2], ["no", "yes"][(i // 2) % 2]])
    return rows


HEADER = ["age", "income", "job", "city", "y"]


def table_source(tmp_path: Path) -> Path:
    """train.csv.gz (';'-separated, quoted) and test.csv (','-separated), the test part with a job the
    training part never has ('chef')."""
    folder = tmp_path / "bank"
    folder.mkdir()
    write_csv(folder / "train.csv.gz", bank_like(120, 0), HEADER, sep=";")
    test = bank_like(30, 1)
    test[0][2] = test[5][2] = "chef"
    write_csv(folder / "test.csv", test, HEADER, sep=",")
    return folder


TABLE = {"label_column": "y", "na_values": "unknown", "progress": False}


def test_strings_become_one_hot_blocks_fitted_on_the_training_pool_and_stay_unscaled(tmp_path):
    import pandas as pd

    source = table_source(tmp_path)
    url = str(tmp_path / "shards")
    m = build("table", url, str(source), num_labelled=10, **TABLE)
    assert m["source"]["separator"] == {"train": ";", "test": ","}  # found in each file
    assert m["class_names"] == ["no", "yes"] and m["x_shape"] == [12]
    cols = m["columns"]
    # [age, income, age is missing, income is missing, job (5), city (3)]
    assert [(c["name"], c["column"], c["missing_indicator"]) for c in cols["numeric"]] == [("age", 0, 2), ("income", 1, 3)]
    assert cols["categorical"] == [
        {"name": "job", "start": 4, "size": 5, "categories": ["(missing)", "admin", "blue", "tech", "(unseen)"]},
        {"name": "city", "start": 9, "size": 3, "categories": ["north", "south", "(unseen)"]}]
    assert m["normalisation"]["columns"] == [0, 1]  # only the numeric columns are scaled
    assert m["source"]["feature_names"][2:5] == ["age is missing", "income is missing", "job=(missing)"]

    train = pd.read_csv(source / "train.csv.gz", sep=";", na_values=["unknown"])
    test = pd.read_csv(source / "test.csv", na_values=["unknown"])
    pool = np.concatenate([m["split_indices"]["labelled"], m["split_indices"]["unlabelled"]])
    for c in cols["numeric"]:  # the median of the training pool's present values, not of all rows
        assert c["median"] == pytest.approx(train[c["name"]].iloc[pool].median())
    for split in SPLITS:
        x, y, _ = read_split(url, split)
        rows = (test if split == "test" else train).iloc[m["split_indices"][split]]
        onehot = x[:, 2:]
        assert set(np.unique(onehot)) <= {0.0, 1.0}  # indicators and one-hot codes: not standardised
        for block in cols["categorical"]:
            codes = onehot[:, block["start"] - 2:block["start"] - 2 + block["size"]]
            assert (codes.sum(1) == 1).all()
            got = np.array(block["categories"])[codes.argmax(1)]
            want = rows[block["name"]].fillna("(missing)").to_numpy()
            want = np.where(np.isin(want, block["categories"]), want, "(unseen)")
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(x[:, 2], rows["age"].isna().to_numpy())
        np.testing.assert_array_equal(x[:, 3], rows["income"].isna().to_numpy())
        norm = m["normalisation"]
        filled = rows[["age", "income"]].fillna({c["name"]: c["median"] for c in cols["numeric"]}).to_numpy()
        np.testing.assert_allclose(x[:, :2], (filled - norm["mean"]) / norm["std"], rtol=1e-5, atol=1e-5)
        if split == "test":  # the job the training part lacks takes the reserved slot
            job = cols["categorical"][0]
            chef = rows["job"].to_numpy() == "chef"
            assert chef.sum() == 2 and (x[chef, job["start"] + job["size"] - 1] == 1).all()
    pool_x = np.concatenate([read_split(url, s)[0] for s in ("labelled", "unlabelled")])
    np.testing.assert_allclose(pool_x[:, :2].mean(0), 0, atol=1e-5)  # scaled with the pool's statistics

    q = build("table", str(tmp_path / "q"), str(source), num_labelled=10, features="quantile", **TABLE)
    xq = read_split(str(tmp_path / "q"), "unlabelled")[0]
    assert q["normalisation"]["columns"] == [0, 1] and set(np.unique(xq[:, 2:])) <= {0.0, 1.0}


def test_scaling_leaves_the_columns_it_was_not_fitted_on_alone():
    rng = np.random.default_rng(0)
    x = np.c_[rng.normal(5, 2, size=200), rng.integers(0, 2, size=200), rng.exponential(size=200)]
    for method in features.METHODS:
        norm = features.fit(x, method, columns=[0, 2])
        z = features.to_model(x, norm)
        np.testing.assert_array_equal(z[:, 1], x[:, 1])
        np.testing.assert_allclose(z[:, [0, 2]].mean(0), 0, atol=1e-5)
        back = features.to_data(z, norm)
        np.testing.assert_array_equal(back[:, 1], x[:, 1])
        np.testing.assert_allclose(back[:, 0], x[:, 0], atol=0.05 if method == "quantile" else 1e-5)


def _bad(tmp_path: Path, name: str, rows: list[list], header=HEADER) -> str:
    return str(write_csv(tmp_path / name, rows, header))


def test_what_a_table_reader_cannot_use_is_one_line(tmp_path):
    out = str(tmp_path / "out")
    rows = bank_like(60, 0)
    no_label = [r[:] for r in rows]
    no_label[3][4] = no_label[8][4] = ""
    with pytest.raises(DataError, match=r"no_label.csv: 2 row\(s\) of part 'all' have no label in column 'y' \(empty, "
                                        r"or one of the missing-value markers \['unknown'\]\), the first at data row 3; "
                                        r"drop those rows"):
        build("table", out, _bad(tmp_path, "no_label.csv", no_label), num_labelled=10, **TABLE)
    empty = [r[:3] + [""] + r[3:] for r in rows]
    source = _bad(tmp_path, "empty.csv", empty, ["age", "income", "job", "notes", "city", "y"])
    with pytest.raises(DataError, match=r"empty.csv: column 'notes' has no value: all 60 are missing \(empty, or one of "
                                        r"the missing-value markers \['unknown'\]\); drop it with --drop-columns"):
        build("table", out, source, num_labelled=10, **TABLE)
    assert build("table", out, source, num_labelled=10, drop_columns="notes", **TABLE)["x_shape"] == [12]
    with pytest.raises(DataError, match=r"no label column 'label' \(columns: \['age', 'income', 'job', 'city', 'y'\]\); "
                                        r"set --label-column"):
        build("table", out, _bad(tmp_path, "t.csv", rows), num_labelled=10, progress=False)
    with pytest.raises(DataError, match=r"--drop-columns names \['salary'\], which the table lacks"):
        build("table", out, _bad(tmp_path, "t.csv", rows), num_labelled=10, drop_columns="salary", **TABLE)
    with pytest.raises(DataError, match=r"the label column 'y' is also named as a feature; remove it from "
                                        r"--feature-columns"):
        build("table", out, _bad(tmp_path, "t.csv", rows), num_labelled=10, feature_columns="age,y", **TABLE)
    with pytest.raises(DataError, match=r"--categorical-columns names \['age'\], which are not feature columns "
                                        r"\(dropped by --drop-columns or left out of --feature-columns\)"):
        build("table", out, _bad(tmp_path, "t.csv", rows), num_labelled=10, feature_columns="job,city",
              categorical_columns="age", **TABLE)
    with pytest.raises(DataError, match=r"column 'income' holds numbers and 1 other value\(s\) such as \['unknown'\]: "
                                        r"if they mark missing values add them to --na-values"):
        build("table", out, _bad(tmp_path, "t.csv", rows), num_labelled=10, label_column="y", progress=False)
    with pytest.raises(DataError, match=r"t.csv: read as one column with the separator ',' \(columns: \['age;\"income\";"
                                        r".*\]\); set --separator to the file's own"):
        build("table", out, _bad(tmp_path, "t.csv", rows), num_labelled=10, separator=",", **TABLE)
    (tmp_path / "pool").mkdir()  # a column with values in the test part only: nothing to fit on
    write_csv(tmp_path / "pool" / "train.csv", [["", *r[1:]] for r in rows], HEADER)
    write_csv(tmp_path / "pool" / "test.csv", bank_like(20, 1), HEADER)
    with pytest.raises(DataError, match=r"pool: column 'age' has no value in the training pool \(54 rows, all missing\); "
                                        r"drop it with --drop-columns"):
        build("table", out, str(tmp_path / "pool"), num_labelled=10, **TABLE)
    ids = [r + [f"id{i}"] for i, r in enumerate(bank_like(1200, 0))]
    with pytest.raises(DataError, match=r"column 'id' has 1200 distinct values, an identifier or free text"):
        build("table", out, _bad(tmp_path, "ids.csv", ids, [*HEADER, "id"]), num_labelled=10, **TABLE)


def rare_class_csv(tmp_path: Path) -> str:
    rows = bank_like(90, 0)
    for i, r in enumerate(rows):
        r[4] = "maybe" if i in (10, 40, 70) else r[4]  # a class with 3 rows
    return _bad(tmp_path, "rare.csv", rows)


def table_config(tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(**{"shards": str(tmp_path / "shards"), "dataset": "table", "source": rare_class_csv(tmp_path),
                         "label_column": "y", "na_values": ("unknown",), "num_labelled": 12, **kw})


def test_a_rare_class_asks_for_data_balance_stratified_and_ensure_refuses_other_options(tmp_path):
    with pytest.raises(DataError, match=r"class 'maybe' has only \d examples in the training pool, but the balanced "
                                        r"labelled set of 12 asks for 4 of it; lower data.num_labelled or set "
                                        r"data.balance: stratified"):
        ensure(table_config(tmp_path))
    cfg = table_config(tmp_path, balance="stratified", drop_columns=("city",))
    url = ensure(cfg)
    m = read_manifest(url)
    assert m["build_options"]["balance"] == "stratified" and m["build_options"]["drop_columns"] == ["city"]
    assert min(m["splits"]["labelled"]["class_counts"]) >= 1 and m["x_shape"] == [9]
    assert ensure(cfg) == url  # the same options: read, not rebuilt
    for change, line in [
        ({"na_values": ()}, r"were built with na_values \['unknown'\], but data.na_values is \[\]: point data.shards at "
                            r"a new directory to build them with \[\], or set data.na_values=\[unknown\]"),
        ({"balance": "balanced"}, r"were built with balance 'stratified', but data.balance is 'balanced'"),
        ({"drop_columns": ()}, r"were built with drop_columns \['city'\], but data.drop_columns is \[\]"),
        ({"label_column": "job"}, r"were built with label_column 'y', but data.label_column is 'job'"),
    ]:
        with pytest.raises(DataError, match=line):
            ensure(table_config(tmp_path, **{"balance": "stratified", "drop_columns": ("city",), **change}))


def test_train_stops_a_rare_class_with_one_line_naming_data_balance(tmp_path):
    proc = run_train(["--config", str(REPO / "configs" / "tabular.yaml"), f"data.shards={tmp_path / 'shards'}",
                      "data.dataset=table", f"data.source={rare_class_csv(tmp_path)}", "data.label_column=y",
                      "data.na_values=[unknown]", "data.num_labelled=12", f"train.out_dir={tmp_path / 'run'}"],
                     check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "set data.balance: stratified" in errors[0] and "--balance" not in errors[0]


@pytest.mark.parametrize("override, fragment", [
    (["data.dataset=magic_gamma", "data.label_column=y"], "data.label_column: is for data.dataset table or hf_disk"),
    (["data.dataset=table", "data.na_values=unknown"], "data.na_values: expected a list"),
    (["data.balance=equal"], "data.balance: unknown value 'equal'; valid choices: balanced, stratified"),
    (["data.dataset=table", "data.drop_columns=[a]", "data.categorical_columns=[a]"], "data.drop_columns: ['a'] also"),
    (["data.dataset=table", "data.label_column=y", "data.drop_columns=[y]"], "data.drop_columns: holds the label "
                                                                             "column 'y'; remove it"),
])
def test_table_options_are_validated_in_the_config(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert fragment in str(e.value)
    cfg = load_config(None, ["data.dataset=table", 'data.na_values=[unknown, "?"]', "data.drop_columns=[duration]"])
    assert cfg.data.na_values == ("unknown", "?") and cfg.data.drop_columns == ("duration",)


@pytest.mark.skipif(not (SHARED_DATA / "bank_marketing" / "bank-full.csv.gz").is_file(),
                    reason=f"{SHARED_DATA}/bank_marketing (the shared real tables) is absent")
def test_bank_marketing_config_builds_from_the_original_csv(tmp_path):
    cfg = load_config(str(REPO / "configs" / "bank_marketing.yaml"), [f"data.shards={tmp_path / 'bank'}"])
    cfg.data.source = str(REPO / cfg.data.source)  # the config's path is relative to the checkout
    m = read_manifest(ensure(cfg.data))
    assert m["source"]["separator"] == {"all": ";"} and m["class_names"] == ["no", "yes"]
    blocks = {b["name"]: b["categories"] for b in m["columns"]["categorical"]}
    assert list(blocks) == ["job", "marital", "education", "default", "housing", "loan", "contact", "month",
                            "poutcome"]
    assert all("(missing)" in blocks[c] for c in ("job", "education", "contact", "poutcome"))  # 'unknown'
    assert len(blocks["month"]) == 13 and blocks["marital"] == ["divorced", "married", "single", "(unseen)"]
    assert [c["name"] for c in m["columns"]["numeric"]] == ["age", "balance", "day", "campaign", "pdays", "previous"]
    assert "duration" not in m["source"]["feature_names"]  # it leaks the label: dropped by the config
    assert m["x_shape"] == [59] and m["splits"]["labelled"]["class_counts"] == [10, 10]
    assert sum(info["count"] for info in m["splits"].values()) == 45_211
    x, _, _ = read_split(ensure(cfg.data), "labelled")
    assert set(np.unique(x[:, 6:])) <= {0.0, 1.0} and (x[:, 6:].sum(1) == 9).all()  # one slot per block


def test_the_mixed_likelihood_takes_its_blocks_from_a_table_manifest_and_trains(tmp_path):
    """The tabular default: categorical on the one-hot blocks the manifest names, and a run's stamp says so."""
    import yaml

    from conftest import TINY

    source = write_csv(tmp_path / "t.csv.gz", bank_like(160, 0), HEADER)
    out = tmp_path / "run"
    run_train(["--config", str(REPO / "configs" / "tabular.yaml"), *TINY, f"data.shards={tmp_path / 'shards'}",
               "data.dataset=table", f"data.source={source}", "data.label_column=y", "data.na_values=[unknown]",
               "data.num_labelled=10", "data.batch_labelled=10", "train.steps=6",
               "train.eval_every=3", "train.checkpoint_every=0", f"train.out_dir={out}", "train.log_with=none"])
    model = yaml.safe_load((out / "config.yaml").read_text())["model"]
    blocks = [[b["start"], b["size"]] for b in read_manifest(str(tmp_path / "shards"))["columns"]["categorical"]]
    assert model["likelihood"] == "mixed" and model["categorical_blocks"] == blocks == [[4, 5], [9, 3]]
    sys.path.insert(0, str(REPO / "launch"))
    import reproduce

    stamp = reproduce.run_config(str(REPO / "configs" / "tabular.yaml"), [], "ours", str(tmp_path / "shards"))
    assert stamp["model"]["likelihood"] == "mixed"
