"""Small files in the public formats that shards/sources.py reads, written by the tests themselves,
plus helpers to read shards back and to damage them. Each writer returns what it wrote."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from ssl_ebm.data import eval_batches

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the checkout


def images(rng: np.random.Generator, n: int, h: int = 32, w: int = 32, c: int = 3) -> np.ndarray:
    return rng.integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def balanced_labels(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return rng.permutation(np.arange(n) % k).astype(np.int64)


def write_cifar_python(folder: Path, per_batch: int = 20, n_test: int = 30, seed: int = 0) -> dict:
    """cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}: pickled dicts, data (N, 3072)
    uint8 in channel-major order, labels a list of ints, as in the official archive."""
    rng = np.random.default_rng(seed)
    d = folder / "cifar-10-batches-py"
    d.mkdir(parents=True)
    x_train, y_train = images(rng, 5 * per_batch), balanced_labels(rng, 5 * per_batch, 10)
    x_test, y_test = images(rng, n_test), balanced_labels(rng, n_test, 10)

    def dump(name: str, x: np.ndarray, y: np.ndarray) -> None:
        data = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
        batch = {b"batch_label": name.encode(), b"labels": y.tolist(), b"data": data,
                 b"filenames": [f"{i}.png".encode() for i in range(len(x))]}
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))

    for i in range(5):
        part = slice(i * per_batch, (i + 1) * per_batch)
        dump(f"data_batch_{i + 1}", x_train[part], y_train[part])
    dump("test_batch", x_test, y_test)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2))
    return {"train": (x_train, y_train), "test": (x_test, y_test)}


def tar_gz(folder: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as tar:
        for f in sorted(folder.iterdir()):
            tar.add(f, arcname=f"cifar-10-batches-py/{f.name}")
    return out


def write_svhn(folder: Path, n_train: int = 60, n_test: int = 30, seed: int = 0) -> dict:
    """train_32x32.mat / test_32x32.mat: X (32, 32, 3, N) uint8, y (N, 1) with 10 for digit 0."""
    import scipy.io

    rng = np.random.default_rng(seed)
    out = {}
    for part, n in (("train", n_train), ("test", n_test)):
        x, y = images(rng, n), balanced_labels(rng, n, 10)
        mat = {"X": x.transpose(1, 2, 3, 0), "y": np.where(y == 0, 10, y)[:, None]}
        scipy.io.savemat(folder / f"{part}_32x32.mat", mat)
        out[part] = (x, y)
    return out


AG_WORDS = "market stocks oil game team season election minister software internet chip space".split()


def ag_news_rows(rng: np.random.Generator, n: int, extra: str = "") -> list[tuple[int, str, str]]:
    rows = []
    for i in range(n):
        c = i % 4
        words = rng.choice(AG_WORDS[3 * c:3 * c + 3] + AG_WORDS, size=8)
        rows.append((c + 1, f"Title {i} {extra}", " ".join(words) + " it#39;s a \\\"quote\\\"\\n end"))
    return rows


def write_ag_csv(path: Path, rows: list[tuple[int, str, str]]) -> None:
    """Zhang's format: no header, every field quoted, quotes doubled."""
    lines = "".join(",".join('"' + str(v).replace('"', '""') + '"' for v in r) + "\n" for r in rows)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as f:
        f.write(lines)


def write_miniboone(path: Path, n_signal: int, n_background: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_signal + n_background, 50))
    with open(path, "w") as f:
        f.write(f"   {n_signal}  {n_background}\n")
        for row in x:
            f.write(" " + "  ".join(f"{v:.8E}" for v in row) + "\n")
    return x


def write_hepmass(folder: Path, n_train: int = 80, n_test: int = 40, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    header = "# label," + ",".join(f"f{i}" for i in range(27)) + ",mass"
    out = {}
    for part, n in (("train", n_train), ("test", n_test)):
        y = balanced_labels(rng, n, 2)
        x = rng.normal(size=(n, 28)).round(6)
        lines = [header] + [",".join([f"{float(l):.6f}"] + [f"{v:.6f}" for v in row]) for l, row in zip(y, x)]
        (folder / f"1000_{part}.csv").write_text("\n".join(lines) + "\n")
        out[part] = (x, y)
    return out


def write_casp(path: Path, n: int = 400, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = np.c_[rng.gamma(2.0, 3.0, size=n).round(3), rng.normal(size=(n, 9)).round(4)]
    lines = ["RMSD," + ",".join(f"F{i}" for i in range(1, 10))] + [",".join(f"{v}" for v in row) for row in data]
    path.write_text("\n".join(lines) + "\n")
    return data


def write_idx(folder: Path, prefix: str, x: np.ndarray, y: np.ndarray) -> None:
    head = np.array([2051, *x.shape], ">i4").tobytes()
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(head + x.tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(np.array([2049, len(y)], ">i4").tobytes() + y.astype(np.uint8).tobytes())


def jpeg_npz(path: Path, parts: dict, class_names: list[str]) -> dict:
    """cifar10_jpeg layout: x_{part}_jpeg (bytes back to back), x_{part}_offsets, y_{part}, class_names."""
    from PIL import Image

    arrays, decoded = {"class_names": np.array(class_names)}, {}
    for part, (x, y) in parts.items():
        blobs = []
        for img in x:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=75)
            blobs.append(buf.getvalue())
        arrays[f"x_{part}_jpeg"] = np.frombuffer(b"".join(blobs), np.uint8)
        arrays[f"x_{part}_offsets"] = np.r_[0, np.cumsum([len(b) for b in blobs])].astype(np.int64)
        arrays[f"y_{part}"] = np.asarray(y, np.int64)
        decoded[part] = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])
    np.savez_compressed(path, **arrays)
    return decoded


def tabular_npz(path: Path, n_train: int, n_test: int, d: int, k: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {"class_names": np.array([f"c{i}" for i in range(k)]),
              "feature_names": np.array([f"v{i}" for i in range(d)])}
    for part, n in (("train", n_train), ("test", n_test)):
        arrays[f"x_{part}"] = rng.normal(size=(n, d)).astype(np.float32)
        arrays[f"y_{part}"] = balanced_labels(rng, n, k)
        arrays[f"idx_{part}"] = np.arange(n)
    np.savez_compressed(path, **arrays)
    return arrays


# ----------------------------------------------------------------------------- reading back, damaging


def read_split(url: str, split: str, **kw) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, y, idx of one split in index order, through ssl_ebm.data.eval_batches."""
    batches = list(eval_batches(url, split, batch_size=kw.pop("batch_size", 50), **kw))
    if not batches:
        return np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64)
    x, y, idx = (torch.cat([b[k] for b in batches]).numpy() for k in ("x", "y", "idx"))
    order = np.argsort(idx)
    return x[order], y[order], idx[order]


def to_uint8_hwc(x_BCHW: np.ndarray) -> np.ndarray:
    return np.rint((x_BCHW + 1.0) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)


def standardised(manifest: dict, x: np.ndarray) -> np.ndarray:
    norm = manifest["normalisation"]
    return ((x - np.array(norm["mean"])) / np.array(norm["std"])).astype(np.float32)


def rewrite_shard(folder: Path, name: str, edit, update_manifest: bool = True) -> None:
    """Rewrite the tar `name` in `folder` with edit(list of (member name, bytes)) -> new list, and by
    default record its new sha256 and count in the manifest, so only the damage itself is wrong."""
    import hashlib

    path = folder / name
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    members = edit(members)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    if update_manifest:
        manifest = json.loads((folder / "manifest.json").read_text())
        for info in manifest["splits"].values():
            for shard in info["shards"]:
                if shard["name"] == name:
                    shard["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
        (folder / "manifest.json").write_text(json.dumps(manifest))
