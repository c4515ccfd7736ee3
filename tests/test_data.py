"""ssl_ebm/data.py: batch shapes, disjoint streams across ranks and workers, exactly-once evaluation,
exact resume, standard shards, and one clear DataError for each kind of bad data."""

from __future__ import annotations

import io
import json
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from shard_files import (
    ag_news_rows, read_split, rewrite_shard, to_uint8_hwc, write_ag_csv, write_cifar_python,
)
from shards.make import build
from ssl_ebm.data import DataError, DeviceBatches, eval_batches, read_manifest, split_urls, train_batches


def take(stream, n: int) -> list[dict]:
    return [next(stream) for _ in range(n)]


@pytest.fixture
def cifar(tmp_path) -> Path:
    """Small CIFAR-10 shards: 30 train (10 labelled, 15 unlabelled, 5 val) and 10 test images."""
    write_cifar_python(tmp_path / "src", per_batch=6, n_test=10)
    build("cifar10", str(tmp_path / "shards"), str(tmp_path / "src"), num_labelled=10, num_val=5, shard_size=4,
          progress=False)
    return tmp_path / "shards"


@pytest.fixture(scope="module")
def rows_url(tmp_path_factory) -> str:
    """Vector shards whose first feature is the source row number (recoverable after standardising):
    300 rows -> test 60, val 24, labelled 20, unlabelled 196; shards of 37 so readers split shards."""
    import pandas as pd

    folder = tmp_path_factory.mktemp("rows")
    rng = np.random.default_rng(0)
    n = 300
    pd.DataFrame({"rid": np.arange(n), "noise": rng.normal(size=n), "label": np.arange(n) % 2}).to_csv(
        folder / "rows.csv", index=False)
    build("table", str(folder / "shards"), str(folder / "rows.csv"), num_labelled=20, shard_size=37, progress=False)
    return str(folder / "shards")


def row_ids(manifest: dict, x: torch.Tensor) -> list[int]:
    norm = manifest["normalisation"]
    return np.rint(x[:, 0].numpy() * norm["std"][0] + norm["mean"][0]).astype(int).tolist()


# ----------------------------------------------------------------------------- batches


def test_batch_shapes_for_every_kind(tmp_path, cifar):
    write_ag_csv(tmp_path / "train.csv", ag_news_rows(np.random.default_rng(0), 40))
    write_ag_csv(tmp_path / "test.csv", ag_news_rows(np.random.default_rng(1), 8))
    build("ag_news", str(tmp_path / "ag"), str(tmp_path), num_labelled=8, num_val=4, progress=False)
    build("digits", str(tmp_path / "digits"), progress=False)
    for url, x_shape in ((str(cifar), (3, 32, 32)), (str(tmp_path / "digits"), (64,)),
                         (str(tmp_path / "ag"), tuple(read_manifest(str(tmp_path / "ag"))["x_shape"]))):
        b = next(train_batches(url, batch_unlabelled=6, batch_labelled=4, seed=0))
        assert b["x_u"].shape == (6, *x_shape) and b["x_l"].shape == (4, *x_shape) and b["y_l"].shape == (4,)
        assert b["x_u"].dtype == b["x_l"].dtype == torch.float32 and b["y_l"].dtype == torch.int64
        only_u = next(train_batches(url, batch_unlabelled=5, batch_labelled=0, seed=0))
        assert only_u["x_l"].shape == (0, *x_shape) and only_u["y_l"].shape == (0,)
        only_l = next(train_batches(url, batch_unlabelled=0, batch_labelled=3, seed=0))
        assert only_l["x_u"].shape == (0, *x_shape) and only_l["x_l"].shape == (3, *x_shape)
        e = next(eval_batches(url, "test", batch_size=3))
        assert e["x"].shape == (3, *x_shape) and e["idx"].tolist() == [0, 1, 2] and e["y"].dtype == torch.int64
    images = torch.cat([b["x_u"] for b in take(train_batches(str(cifar), batch_unlabelled=8, batch_labelled=0,
                                                             seed=0), 5)])
    assert images.min() >= -1 and images.max() <= 1 and images.min() < -0.9 and images.max() > 0.9
    counts = next(train_batches(str(tmp_path / "ag"), batch_unlabelled=4, batch_labelled=0, seed=0))["x_u"]
    assert torch.all(counts == counts.round()) and counts.sum() > 0  # dense word counts


def test_two_ranks_two_workers_disjoint_streams_and_exactly_once_eval(rows_url):
    m = read_manifest(rows_url)
    stream_rows = sorted(r for s in m["unlabelled_stream"] for r in m["split_indices"][s])
    labelled_rows = m["split_indices"]["labelled"]
    per_consumer = len(stream_rows) // 4  # 216 examples over 2 ranks x 2 workers
    seen, labelled_seen = {}, {}
    for rank in (0, 1):
        batches = take(train_batches(rows_url, batch_unlabelled=8, batch_labelled=4, seed=5, rank=rank, world_size=2,
                                     num_workers=2), 16)
        for worker in (0, 1):  # batch k of a rank comes from worker k % 2
            rows = [r for b in batches[worker::2] for r in row_ids(m, b["x_u"])]
            first_epoch = rows[:per_consumer]
            assert len(set(first_epoch)) == per_consumer, "a reader repeated an example within an epoch"
            assert set(rows) == set(first_epoch), "a reader left its part in the next epoch"
            seen[rank, worker] = set(first_epoch)
        labelled_seen[rank] = {r for b in batches for r in row_ids(m, b["x_l"])}
        for b in batches:
            assert b["y_l"].tolist() == [r % 2 for r in row_ids(m, b["x_l"])]
    parts = list(seen.values())
    assert all(not (a & b) for i, a in enumerate(parts) for b in parts[i + 1:]), "training streams overlap"
    assert sorted(set().union(*parts)) == stream_rows  # together they cover the unlabelled stream
    # 20 labelled examples, 10 per rank >= max(batch_labelled, classes): disjoint halves
    assert not labelled_seen[0] & labelled_seen[1] and labelled_seen[0] | labelled_seen[1] == set(labelled_rows)
    for split in ("labelled", "unlabelled", "val", "test"):
        idx, rows = [], []
        for rank in (0, 1):
            for b in eval_batches(rows_url, split, batch_size=7, rank=rank, world_size=2, num_workers=2):
                idx += b["idx"].tolist()
                rows += row_ids(m, b["x"])
                assert b["y"].tolist() == [r % 2 for r in row_ids(m, b["x"])]
        assert sorted(idx) == list(range(m["splits"][split]["count"])), f"{split}: not every example exactly once"
        assert [m["split_indices"][split][i] for i in idx] == rows


def test_tiny_labelled_set_is_shared_by_ranks_with_distinct_orders(tmp_path):
    url = str(tmp_path / "s")
    build("digits", url, num_labelled=10, progress=False)  # 10 labels: 5 per rank < 10 classes
    firsts = [next(train_batches(url, batch_unlabelled=0, batch_labelled=10, seed=0, rank=r, world_size=2))
              for r in (0, 1)]
    assert sorted(firsts[0]["y_l"].tolist()) == sorted(firsts[1]["y_l"].tolist()) == list(range(10))
    assert not torch.equal(firsts[0]["x_l"], firsts[1]["x_l"])


@pytest.mark.parametrize("workers, total, starts", [(0, 45, (1, 13, 24, 44)), (2, 12, (5, 8))])
def test_resume_equals_the_tail_of_an_uninterrupted_stream(tmp_path, workers, total, starts):
    url = str(tmp_path / "s")
    build("digits", url, progress=False, shard_size=300)  # 1394 unlabelled-stream examples: ~22 batches an epoch
    kw = dict(batch_unlabelled=64, batch_labelled=16, seed=7, num_workers=workers, shuffle_buffer=200)
    full = take(train_batches(url, **kw), total)
    for k in starts:
        tail = take(train_batches(url, start_step=k, **kw), total - k)
        for a, b in zip(full[k:], tail):
            assert all(torch.equal(a[key], b[key]) for key in ("x_u", "x_l", "y_l")), f"resume at {k} diverged"
    other = next(train_batches(url, **{**kw, "seed": 8}))
    assert not torch.equal(other["x_u"], full[0]["x_u"])



def test_the_in_memory_cache_gives_the_same_batches_and_spares_the_files(tmp_path):
    from ssl_ebm.data import _PartCache, _shard_samples, read_manifest

    url = str(tmp_path / "s")
    build("digits", url, progress=False, shard_size=300)  # 1394 unlabelled-stream examples: ~22 batches an epoch
    kw = dict(batch_unlabelled=64, batch_labelled=16, seed=7, shuffle_buffer=200)
    off = take(train_batches(url, cache_mb=0, **kw), 70)  # three epochs and more
    on = train_batches(url, **kw)
    first = take(on, 25)  # past the first epoch: every part is held
    for shard in Path(url).glob("*.tar"):
        shard.unlink()
    rest = take(on, 45)  # later epochs replay memory; the files are gone
    for a, b in zip(off, first + rest):
        assert all(torch.equal(a[key], b[key]) for key in ("x_u", "x_l", "y_l"))
    with pytest.raises(DataError, match="is missing"):  # without the cache the files are needed
        take(train_batches(url, cache_mb=0, **kw), 1)

    # a budget smaller than the stream keeps the parts that fit and reads the others every time
    build("digits", url, progress=False, shard_size=300)
    manifest = read_manifest(url)
    shard = manifest["splits"]["unlabelled"]["shards"][0]
    one = [s for _, s in _shard_samples(url, shard, 0, 0, shard["count"])]
    size = sum(len(v) for s in one for v in s.values() if isinstance(v, bytes))
    cache = _PartCache(size + 1)
    for _ in range(2):
        assert [s["__key__"] for s in cache.samples(url, shard, 0, 0, shard["count"])] == [s["__key__"] for s in one]
        assert [s["__key__"] for s in cache.samples(url, shard, 0, 0, 10)] == [s["__key__"] for s in one[:10]]
    assert list(cache.parts) == [(shard["name"], 0, shard["count"])] and cache.held == size
    with pytest.raises(DataError, match="cache_mb"):
        train_batches(url, cache_mb=-1, **kw)

# ----------------------------------------------------------------------------- on the device

KEYS = ("x_u", "x_l", "y_l")


def host_path(url: str, n: int, **kw) -> list[dict]:
    """The batches as the training loop took them before DeviceBatches: float32 from the readers, then copied."""
    return [{k: v.to("cpu", non_blocking=True) for k, v in b.items()} for b in take(train_batches(url, **kw), n)]


def assert_same_batches(expected: list[dict], got: list[dict]) -> None:
    assert len(got) == len(expected)
    for step, (a, b) in enumerate(zip(expected, got)):
        for k in KEYS:
            assert b[k].dtype == a[k].dtype and b[k].shape == a[k].shape, (step, k, b[k].dtype, b[k].shape)
            assert torch.equal(a[k], b[k]), f"step {step}: {k} differs from the host path"


@pytest.mark.parametrize("kind, workers", [("image", 0), ("image", 2), ("vector", 0)])
def test_device_batches_equal_the_host_path_bit_for_bit(cifar, digits_shards, kind, workers):
    """uint8 images from the readers, converted by DeviceBatches, are the float32 batches of the host path,
    in the same order, over several epochs of the stream (25 examples in batches of 8)."""
    url = str(cifar) if kind == "image" else digits_shards
    kw = dict(batch_unlabelled=8, batch_labelled=4, seed=3, num_workers=workers, shuffle_buffer=10)
    expected = host_path(url, 10, **kw)
    raw = next(train_batches(url, uint8_images=True, **kw))
    assert raw["x_u"].dtype == (torch.uint8 if kind == "image" else torch.float32)
    assert_same_batches(expected, take(DeviceBatches(train_batches(url, uint8_images=True, **kw), "cpu"), 10))
    if kind == "image":
        pixels = torch.cat([b["x_u"] for b in expected]).unique()
        assert len(pixels) == 256, "every byte value is checked"
        last = take(DeviceBatches(train_batches(url, uint8_images=True, **kw), "cpu", torch.channels_last), 10)
        assert_same_batches(expected, last)
        assert all(b["x_u"].is_contiguous(memory_format=torch.channels_last) for b in last)


def test_device_batches_resume_and_empty_parts(cifar):
    kw = dict(batch_unlabelled=8, batch_labelled=4, seed=5, shuffle_buffer=10, uint8_images=True)
    full = take(DeviceBatches(train_batches(str(cifar), **kw), "cpu"), 9)
    for k in (1, 4):
        assert_same_batches(full[k:], take(DeviceBatches(train_batches(str(cifar), start_step=k, **kw), "cpu"), 9 - k))
    only_u = next(DeviceBatches(train_batches(str(cifar), **{**kw, "batch_labelled": 0}), "cpu"))
    assert only_u["x_l"].shape == (0, 3, 32, 32) and only_u["x_l"].dtype == torch.float32
    assert torch.equal(only_u["x_u"], full[0]["x_u"])


def test_device_batches_raise_a_stream_error_where_the_host_path_does(cifar):
    """Reading one batch ahead must not move an error: the batches before it come first, then the DataError."""
    path, _ = first_shard(cifar)
    data = bytearray(path.read_bytes())
    data[512 + 512 + 512 + 200] ^= 0xFF  # one pixel of the first sample: a sha256 mismatch at the shard's end
    path.write_bytes(bytes(data))
    kw = dict(batch_unlabelled=4, batch_labelled=0, seed=0, shuffle_buffer=0, cache_mb=0)

    def until_error(stream) -> tuple[list[dict], str]:
        got = []
        with pytest.raises(DataError, match="has sha256") as e:
            for _ in range(20):
                got.append(next(stream))
        return got, str(e.value)

    expected, message = until_error(train_batches(str(cifar), **kw))
    assert len(expected) >= 1, "the damaged shard should not be the first one read"
    got, got_message = until_error(DeviceBatches(train_batches(str(cifar), uint8_images=True, **kw), "cpu"))
    assert_same_batches(expected, got)
    assert got_message == message


# ----------------------------------------------------------------------------- standard shards


def test_shards_are_standard_tar_files_that_plain_webdataset_reads(cifar):
    import webdataset as wds

    urls = split_urls(str(cifar), "unlabelled")
    listing = subprocess.run(["tar", "-tf", urls[0]], capture_output=True, text=True, check=True).stdout.split()
    assert listing[:4] == ["00000000.cls", "00000000.npy", "00000001.cls", "00000001.npy"]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())
    x, y, _ = read_split(str(cifar), "unlabelled")
    assert [s["__key__"] for s in samples] == [f"{i:08d}" for i in range(len(x))]
    np.testing.assert_array_equal(np.stack([s["npy"] for s in samples]), to_uint8_hwc(x))
    assert [s["cls"] for s in samples] == y.tolist()


# ----------------------------------------------------------------------------- bad data: one clear error each


def first_shard(folder: Path, split: str = "unlabelled") -> tuple[Path, str]:
    name = read_manifest(str(folder))["splits"][split]["shards"][0]["name"]
    return folder / name, f"shard {folder}/{name}"


def read_all(folder: Path, split: str = "unlabelled") -> None:
    list(eval_batches(str(folder), split, batch_size=2))


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def replace(member: str, data: bytes):
    return lambda members: [(n, data if n == member else d) for n, d in members]


@pytest.mark.parametrize("damage, message", [
    ("cut_between_samples", r"ends after 2 of its 4 samples \(truncated or corrupt\); rebuild the shards"),
    ("cut_inside_sample", r"is truncated or corrupt near sample 00000002 \(ReadError: unexpected end of data\); "
                          r"rebuild the shards or copy the file again$"),
    ("garbage_header", r"ends after 1 of its 4 samples \(truncated or corrupt\)"),
    ("flipped_pixel", r"has sha256 [0-9a-f]{64}, the manifest says [0-9a-f]{64}: the file is corrupt"),
])
def test_truncated_corrupt_or_altered_shards(cifar, damage, message):
    path, where = first_shard(cifar)
    data = bytearray(path.read_bytes())
    sample = 512 + 512 + 512 + 3584  # cls header + data, npy header + 3,200 bytes padded
    if damage == "cut_between_samples":
        data = data[:2 * sample]
    elif damage == "cut_inside_sample":
        data = data[:2 * sample + 1024 + 700]
    elif damage == "garbage_header":
        data[sample:sample + 512] = b"\x07" * 512
    else:
        data[sample + 1024 + 512 + 200] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"^{where} .*" if damage != "flipped_pixel" else message) as e:
        read_all(cifar)
    assert e.match(message)
    with pytest.raises(DataError, match=message):
        next(train_batches(str(cifar), batch_unlabelled=30, batch_labelled=0, seed=0))


@pytest.mark.parametrize("edit, message", [
    (lambda ms: [(n, d) for n, d in ms if n != "00000001.cls"], r"sample '00000001' lacks the field\(s\) \['cls'\]"),
    (replace("00000001.npy", npy(np.zeros((16, 16, 3), np.uint8))),
     r"sample '00000001': 'npy' holds uint8 \(16, 16, 3\), the manifest says uint8 \(32, 32, 3\)"),
    (replace("00000001.npy", npy(np.zeros((32, 32, 3), np.float32))), r"'npy' holds float32 \(32, 32, 3\)"),
    (replace("00000001.npy", b"not an array"), r"'npy' is not a valid .npy array"),
    (replace("00000001.cls", b"12"), r"sample '00000001': label 12 is out of range \[0, 10\) for 10 classes"),
    (lambda ms: [(n.replace("00000001", "00000009"), d) for n, d in ms],
     r"sample '00000009' where index 00000001 was expected"),
])
def test_bad_samples(cifar, edit, message):
    path, where = first_shard(cifar)
    rewrite_shard(cifar, path.name, edit)  # the manifest's sha256 is updated: only the sample is wrong
    with pytest.raises(DataError, match=f"^{where}.*{message}"):
        read_all(cifar)
    with pytest.raises(DataError, match=message):
        next(train_batches(str(cifar), batch_unlabelled=30, batch_labelled=0, seed=0, shuffle_buffer=0))


def test_missing_or_broken_manifest_and_shards(tmp_path, cifar):
    with pytest.raises(DataError, match=rf"no shards at {tmp_path}/none: .*manifest.json does not exist. Build them "
                                        r"with `python -m shards.make --dataset NAME --source PATH --out"):
        read_manifest(str(tmp_path / "none"))
    with pytest.raises(DataError, match="no shards at memory://"):
        train_batches(f"memory://nothing-{uuid.uuid4().hex}", batch_unlabelled=1, batch_labelled=0, seed=0)
    manifest = json.loads((cifar / "manifest.json").read_text())
    (cifar / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "splits"}))
    with pytest.raises(DataError, match=r"manifest .*manifest.json: lacks the keys \['splits'\]; rebuild"):
        read_manifest(str(cifar))
    (cifar / "manifest.json").write_text("{ not json")
    with pytest.raises(DataError, match="is not valid JSON"):
        read_manifest(str(cifar / "manifest.json"))
    (cifar / "manifest.json").write_text(json.dumps(manifest))
    first_shard(cifar, "test")[0].unlink()
    with pytest.raises(DataError, match=r"shard .*test-000000.tar is missing \(the manifest lists it\)"):
        read_all(cifar, "test")
    with pytest.raises(DataError, match="have no split 'train'"):
        eval_batches(str(cifar), "train", batch_size=2)


def test_unreachable_url_or_missing_backend():
    with pytest.raises(DataError, match=r"cannot open 'gcs://bucket/x/manifest.json': .*gcsfs.*Install that fsspec"):
        read_manifest("gcs://bucket/x")


def test_s3_round_trip_and_unreachable_endpoint(monkeypatch):
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install 'ssl-ebm[s3]')")
    moto_server = pytest.importorskip("moto.server", reason="moto (a local S3 server for tests) is not installed")
    import fsspec.config
    import s3fs

    server = moto_server.ThreadedMotoServer(port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        conf = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": f"http://{host}:{port}",
                                                                    "region_name": "eu-west-1"}}
        monkeypatch.setitem(fsspec.config.conf, "s3", conf)
        s3fs.S3FileSystem.clear_instance_cache()
        fsspec.filesystem("s3").mkdir("shards")
        m = build("digits", "s3://shards/digits", progress=False)
        x, _, idx = read_split("s3://shards/digits", "test")
        assert len(idx) == m["splits"]["test"]["count"]
        batch = next(train_batches("s3://shards/digits", batch_unlabelled=4, batch_labelled=2, seed=0))
        assert batch["x_u"].shape == (4, 64)
        with pytest.raises(DataError, match="no shards at s3://no-such-bucket/x"):
            read_manifest("s3://no-such-bucket/x")
        conf = {**conf, "client_kwargs": {**conf["client_kwargs"], "endpoint_url": "http://127.0.0.1:9"},
                "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}
        monkeypatch.setitem(fsspec.config.conf, "s3", conf)
        s3fs.S3FileSystem.clear_instance_cache()
        with pytest.raises(DataError, match=r"cannot read manifest s3://shards/digits/manifest.json: "
                                            r"EndpointConnectionError.*Check the URL, the bucket, credentials"):
            read_manifest("s3://shards/digits")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def test_bad_arguments(cifar):
    with pytest.raises(DataError, match="not both 0"):
        train_batches(str(cifar), batch_unlabelled=0, batch_labelled=0, seed=0)
    with pytest.raises(DataError, match="rank 2 is outside"):
        eval_batches(str(cifar), "test", batch_size=2, rank=2, world_size=2)
    with pytest.raises(DataError, match="fewer than the 32 readers"):
        train_batches(str(cifar), batch_unlabelled=2, batch_labelled=0, seed=0, world_size=8, num_workers=4)


@pytest.fixture
def table(tmp_path) -> Path:
    """Small vector shards: 80 rows of 3 standardised float32 features, shards of 10."""
    import pandas as pd

    rng = np.random.default_rng(0)
    pd.DataFrame({"a": rng.normal(size=80), "b": rng.normal(size=80), "c": rng.normal(size=80),
                  "label": np.arange(80) % 2}).to_csv(tmp_path / "t.csv", index=False)
    build("table", str(tmp_path / "shards"), str(tmp_path / "t.csv"), num_labelled=10, shard_size=10, progress=False)
    return tmp_path / "shards"


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_features_in_a_shard(table, value):
    path, where = first_shard(table)
    x = np.array([0.5, value, -1.0], np.float32)
    rewrite_shard(table, path.name, replace("00000001.npy", npy(x)))  # sha256 updated: only the value is wrong
    message = r"sample '00000001': 'npy' holds 1 non-finite value\(s\) \(NaN or inf\), the first at flat position 1"
    with pytest.raises(DataError, match=f"^{where} {message}; clean or impute the source and rebuild the shards$"):
        read_all(table)
    with pytest.raises(DataError, match=message):
        next(train_batches(str(table), batch_unlabelled=20, batch_labelled=0, seed=0, shuffle_buffer=0))


def test_sha256_mismatch_with_an_intact_tar(table):
    """A well-formed shard from another build (right count, readable samples) is still refused."""
    path, where = first_shard(table)
    rewrite_shard(table, path.name, replace("00000001.npy", npy(np.zeros(3, np.float32))), update_manifest=False)
    with pytest.raises(DataError, match=rf"^{where} has sha256 [0-9a-f]{{64}}, the manifest says [0-9a-f]{{64}}: "
                                        "the file is corrupt or belongs to another build"):
        read_all(table)
