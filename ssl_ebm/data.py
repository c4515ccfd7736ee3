"""WebDataset pipelines: the unlabelled and labelled training streams, and one-pass evaluation.

Shards are written by `python -m shards.make` (layout in shards/make.py); this module reads them.

    read_manifest(url)            the checked manifest.json of a shard directory
    train_batches(url, ...)       endless {"x_u", "x_l", "y_l"} batches for one rank
    DeviceBatches(batches, device) those batches on the device, the next one copied while a step runs
    eval_batches(url, split, ...) one pass over a split: {"x", "y", "idx"}

Shapes: B = batch size, x_shape = manifest["x_shape"] ((C, H, W) images, (D,) vectors, (V,) counts).
Decoding: images uint8 -> float32 x / 127.5 - 1; vectors are stored standardised float32; word counts
are stored sparse and come out as dense float32 counts. For training, images can instead leave the
readers as stored, uint8 (B, H, W, C) (`train_batches(..., uint8_images=True)`: a quarter of the bytes
to move and pin), and DeviceBatches converts them on the device to the same float32, bit for bit.

Who reads what. A rank's workers are "consumers": consumer g = rank * W + worker of G = world_size * W
(W = max(num_workers, 1)).
- Unlabelled stream: the splits listed in manifest["unlabelled_stream"] ("unlabelled", then "val" where
  the protocol lets validation examples feed it, then "labelled" when the labelled examples also feed the
  unlabelled stream, the default), seen as one index range
  [0, N). Consumer g owns [g*N//G, (g+1)*N//G): streams of different ranks and workers are disjoint
  and differ in size by at most one example, however many shards there are. Every epoch a consumer
  reads the shards overlapping its range in a fresh seeded order through a seeded shuffle buffer that
  is emptied at the end of the epoch, forever.
- Labelled stream: the labelled split is small (often 20-4000 examples) and is written in an order
  that interleaves the classes, so any contiguous part of it is class-balanced. If every rank can have
  at least max(batch_labelled, num_classes) examples, rank r gets the contiguous part
  [r*L//world_size, (r+1)*L//world_size) (disjoint across ranks); otherwise every rank uses the whole
  labelled set. A worker holds its rank's part in memory (raw bytes) and draws from a fresh seeded
  permutation of it each epoch; the seeds differ by rank and worker.
- Evaluation: consumer g reads exactly the examples [g*N//G, (g+1)*N//G) of the split, in order; so
  every example is seen once across ranks and workers, with no padding. Ranks may then hold one
  batch more or less than each other: gather results once at the end, not per batch.

Determinism. Everything random is seeded by (seed, rank, worker, epoch). With W workers, batch k of a
rank comes from worker k % W (DataLoader hands out batches round-robin), as that worker's batch k // W.
`start_step=k` relabels the workers so that the first batch comes from worker k % W, and each worker
fast-forwards past the batches it made before step k: whole epochs are skipped by arithmetic, and
within the current epoch the skipped examples are read from the tar files but not decoded. So a resume
costs at most one epoch of tar reading per worker (about 60 us per example on one core: 3 s for all of
CIFAR-10's 45,000 training images), and yields exactly the batches an uninterrupted stream (same seed,
batch sizes, world_size and num_workers) yields from step k on.

Why not webdataset's split_by_node / split_by_worker: they hand out whole shards, which cannot give
disjoint, equal parts when there are fewer shards than readers. The tar reading, sample grouping and
shuffle buffer are webdataset's; the partition is by example index instead.

Memory. After its first, fully checked read of a shard part, a consumer keeps the part's raw samples
in memory (up to cache_mb, default 1024 MiB per consumer) and replays them in later epochs: the same
batches, without parsing tar headers again, which is most of a small-record stream's cost (tabular
rows: 80 ms a batch of 276 from the tar files against 6 ms from memory, on one busy core). Parts past
the budget are read from storage every epoch. cache_mb=0 (config data.cache_mb) turns it off.

Storage: any fsspec URL. memory:// lives inside one process, so with num_workers > 0 it works only
where DataLoader workers are forked (the Linux default).

Integrity. Every shard read is checked against the manifest: its sha256 (bytes past a consumer's range
are hashed but not parsed), its sample count and order, every sample's fields, dtype, shape and label, and that float features are finite.
Anything wrong raises DataError naming the shard and sample and saying what to do; nothing is skipped.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import filters as wds_filters
from webdataset import tariterators

from ssl_ebm.shard_format import (  # noqa: F401 - DataError and the constants are part of this module's API
    FORMAT_VERSION, KINDS, LABEL_FIELD, MANIFEST, SPLITS, X_FIELDS, DataError, url_to_fs)
from ssl_ebm.shard_format import BUILD_HINT as _BUILD_HINT
from ssl_ebm.shard_format import locate as _locate

_REQUIRED_KEYS = ("format_version", "dataset", "kind", "x_shape", "num_classes", "class_names", "splits",
                  "x_field", "stored_shape", "stored_dtype", "unlabelled_stream")


# ----------------------------------------------------------------------------- manifest and storage


def _read_bytes(url: str, what: str) -> bytes:
    fs, path = url_to_fs(url)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise
    except Exception as e:  # network, permissions, missing bucket: all end here with the URL named
        raise DataError(f"cannot read {what} {url}: {type(e).__name__}: {e}. Check the URL, the bucket, "
                        "credentials and the network") from None


def read_manifest(url: str) -> dict:
    """The manifest of the shard directory `url` (or of the manifest.json URL itself), checked."""
    root, murl = _locate(url)
    try:
        raw = _read_bytes(murl, "manifest")
    except FileNotFoundError:
        raise DataError(f"no shards at {root}: {murl} does not exist. Build them with "
                        f"`{_BUILD_HINT.format(url=root)}`, or set data.dataset (and data.source) so "
                        "launch/train.py builds them on first use") from None
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"manifest {murl} is not valid JSON ({e}); rebuild the shards with "
                        f"`{_BUILD_HINT.format(url=root)}`") from None
    _check_manifest(manifest, murl)
    return manifest


def _check_manifest(m: Any, murl: str) -> None:
    def fail(msg: str) -> None:
        raise DataError(f"manifest {murl}: {msg}; rebuild the shards with `{_BUILD_HINT.format(url=_locate(murl)[0])}`")

    if not isinstance(m, dict):
        fail("is not a JSON object")
    missing = [k for k in _REQUIRED_KEYS if k not in m]
    if missing:
        fail(f"lacks the keys {missing}")
    if m["format_version"] != FORMAT_VERSION:
        fail(f"has format_version {m['format_version']!r}, this code reads {FORMAT_VERSION}")
    if m["kind"] not in KINDS:
        fail(f"unknown kind {m['kind']!r} (known: {', '.join(KINDS)})")
    if m["x_field"] not in X_FIELDS[m["kind"]]:
        fail(f"x_field {m['x_field']!r} is not one of {X_FIELDS[m['kind']]} for kind {m['kind']!r}")
    if len(m["x_shape"]) != (3 if m["kind"] == "image" else 1):
        fail(f"x_shape {m['x_shape']} does not fit kind {m['kind']!r}")
    if len(m["class_names"]) != m["num_classes"]:
        fail(f"has {len(m['class_names'])} class_names for num_classes {m['num_classes']}")
    for split, info in m["splits"].items():
        if split not in SPLITS:
            fail(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
        if sum(s["count"] for s in info["shards"]) != info["count"]:
            fail(f"split {split!r}: shard counts do not add up to {info['count']}")
    for split in m["unlabelled_stream"]:
        if split not in m["splits"]:
            fail(f"unlabelled_stream names split {split!r}, which has no shards")


def _split_info(manifest: dict, split: str, url: str) -> dict:
    if split not in manifest["splits"]:
        raise DataError(f"shards at {_locate(url)[0]} have no split {split!r} (they have: "
                        f"{', '.join(manifest['splits'])}); rebuild them or pick another split")
    return manifest["splits"][split]


def split_urls(url: str, split: str) -> list[str]:
    """The shard URLs of one split, for plain webdataset code: `webdataset.WebDataset(split_urls(...))`."""
    manifest = read_manifest(url)
    root = _locate(url)[0]
    return [f"{root}/{s['name']}" for s in _split_info(manifest, split, url)["shards"]]


# ----------------------------------------------------------------------------- reading one shard


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes every byte read through it (sha256 of the whole file at the end)."""

    def __init__(self, f: Any) -> None:
        super().__init__()
        self.f = f
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return self.sha.hexdigest()


def _shard_samples(root: str, shard: dict, first: int, lo: int, hi: int) -> Iterator[tuple[int, dict]]:
    """(index in split, raw sample) for the examples lo <= index < hi of one shard holding indices
    first .. first + count - 1. The whole file is hashed and checked against the manifest; samples
    past `hi` are hashed but not parsed (so extra samples show up as a sha256 mismatch)."""
    url = f"{root}/{shard['name']}"
    fs, path = url_to_fs(url)
    try:
        f = fs.open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"shard {url} is missing (the manifest lists it); rebuild the shards with "
                        f"`{_BUILD_HINT.format(url=root)}`") from None
    except Exception as e:
        raise DataError(f"cannot open shard {url}: {type(e).__name__}: {e}. Check the URL, the bucket, "
                        "credentials and the network") from None
    end = first + shard["count"]
    expected = first
    with f:
        reader = _HashingReader(f)
        files = tariterators.tar_file_expander([{"url": url, "stream": reader}], eof_value=None)
        samples = tariterators.group_by_keys(files)
        try:
            for sample in samples:
                key = sample["__key__"]
                if key != f"{expected:08d}":
                    raise DataError(f"shard {url}: sample {key!r} where index {expected:08d} was expected "
                                    "(samples out of order or missing); rebuild the shards")
                if expected >= lo:
                    yield expected, sample
                expected += 1
                if expected >= hi:
                    break
        except GeneratorExit:  # closed early, perhaps at interpreter exit when this module's names are gone
            raise
        except DataError:
            raise
        except Exception as e:  # tarfile / webdataset errors on truncated or corrupt bytes
            # webdataset's messages carry the stream object ("... @ <_HashingReader object at 0x...>"): drop it
            detail = (e.args[0] if e.args and isinstance(e.args[0], str) else str(e)).split(" @ <")[0]
            raise DataError(f"shard {url} is truncated or corrupt near sample {expected:08d} "
                            f"({type(e).__name__}: {detail}); rebuild the shards or copy the file again") from None
        finally:
            samples.close()
        if expected < min(hi, end):
            raise DataError(f"shard {url} ends after {expected - first} of its {shard['count']} samples "
                            "(truncated or corrupt); rebuild the shards or copy the file again")
        try:
            digest = reader.drain()
        except Exception as e:
            raise DataError(f"cannot read shard {url} to its end ({type(e).__name__}: {e})") from None
    if digest != shard["sha256"]:
        raise DataError(f"shard {url} has sha256 {digest}, the manifest says {shard['sha256']}: the file is "
                        "corrupt or belongs to another build; rebuild the shards or copy the file again")


class _Segments:
    """Several splits seen as one index range [0, N), shard by shard, for contiguous partitions."""

    def __init__(self, manifest: dict, root: str, splits: Sequence[str]) -> None:
        self.root = root
        self.parts = []  # (global start, split, shard, index of its first example in the split)
        start = 0
        for split in splits:
            first = 0
            for shard in manifest["splits"][split]["shards"]:
                self.parts.append((start, split, shard, first))
                start += shard["count"]
                first += shard["count"]
        self.size = start

    def shards_in(self, lo: int, hi: int) -> list[tuple[str, dict, int, int, int]]:
        """(split, shard, first, local lo, local hi) for each shard overlapping [lo, hi)."""
        out = []
        for start, split, shard, first in self.parts:
            a, b = max(lo, start), min(hi, start + shard["count"])
            if a < b:
                out.append((split, shard, first, first + a - start, first + b - start))
        return out


def _part(n: int, i: int, parts: int) -> tuple[int, int]:
    return n * i // parts, n * (i + 1) // parts


def _seed(*keys: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0])


# ----------------------------------------------------------------------------- decoding


class _Decoder:
    """Checks raw samples against the manifest and turns lists of them into batch tensors."""

    def __init__(self, manifest: dict) -> None:
        self.kind = manifest["kind"]
        self.field = manifest["x_field"]
        self.x_shape = tuple(manifest["x_shape"])
        self.stored_shape = tuple(manifest["stored_shape"])
        self.dtype = np.dtype(manifest["stored_dtype"])
        self.num_classes = int(manifest["num_classes"])
        self.fields = {self.field, LABEL_FIELD}
        self.header = b""
        if self.field == "npy":  # fast path: the exact bytes np.save writes before the data
            buf = io.BytesIO()
            np.save(buf, np.zeros(self.stored_shape, self.dtype))
            self.header = buf.getvalue()[: buf.tell() - self.dtype.itemsize * int(np.prod(self.stored_shape))]
            self.nbytes = len(self.header) + self.dtype.itemsize * int(np.prod(self.stored_shape))

    @staticmethod
    def _where(sample: dict) -> str:
        return f"shard {sample['__url__']} sample {sample['__key__']!r}"

    def check_fields(self, sample: dict) -> None:
        missing = self.fields - sample.keys()
        if missing:
            have = sorted(k for k in sample if not k.startswith("__"))
            raise DataError(f"{self._where(sample)} lacks the field(s) {sorted(missing)} (it has {have}); "
                            "the shard is damaged or was not written by shards.make: rebuild the shards")

    def label(self, sample: dict) -> int:
        raw = sample[LABEL_FIELD]
        try:
            y = int(raw)
        except ValueError:
            raise DataError(f"{self._where(sample)}: label {raw[:20]!r} is not an integer; "
                            "rebuild the shards") from None
        if not 0 <= y < self.num_classes:
            raise DataError(f"{self._where(sample)}: label {y} is out of range [0, {self.num_classes}) for "
                            f"{self.num_classes} classes; rebuild the shards or fix num_classes in the source")
        return y

    def x(self, sample: dict) -> np.ndarray:
        data = sample[self.field]
        if self.field == "npy":
            if len(data) == self.nbytes and data.startswith(self.header):
                return self._finite(sample, np.frombuffer(data, self.dtype, offset=len(self.header))
                                    .reshape(self.stored_shape))
            arr = self._load_npy(sample, data)  # another writer's header layout is fine; other contents are not
            if arr.dtype == self.dtype and arr.shape == self.stored_shape:
                return self._finite(sample, np.ascontiguousarray(arr))
            raise DataError(f"{self._where(sample)}: 'npy' holds {arr.dtype} {tuple(arr.shape)}, the manifest "
                            f"says {self.dtype} {self.stored_shape}; rebuild the shards")
        if self.field == "bow.npy":
            arr = self._load_npy(sample, data)
            if arr.dtype != self.dtype or arr.ndim != 2 or arr.shape[0] != 2:
                raise DataError(f"{self._where(sample)}: 'bow.npy' holds {arr.dtype} {tuple(arr.shape)}, expected "
                                f"{self.dtype} (2, n) word ids and counts; rebuild the shards")
            if arr.shape[1] and (arr[0].min() < 0 or arr[0].max() >= self.x_shape[0] or arr[1].min() < 1):
                raise DataError(f"{self._where(sample)}: word ids outside [0, {self.x_shape[0]}) or counts < 1; "
                                "rebuild the shards")
            return arr
        return self._image(sample, data)

    def _finite(self, sample: dict, arr: np.ndarray) -> np.ndarray:
        """Float features must be finite: one NaN would turn every loss of its batch into NaN."""
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = np.flatnonzero(~np.isfinite(arr.reshape(-1)))
            raise DataError(f"{self._where(sample)}: 'npy' holds {len(bad)} non-finite value(s) (NaN or inf), the "
                            f"first at flat position {bad[0]}; clean or impute the source and rebuild the shards")
        return arr

    def _load_npy(self, sample: dict, data: bytes) -> np.ndarray:
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as e:
            raise DataError(f"{self._where(sample)}: '{self.field}' is not a valid .npy array ({e}); "
                            "rebuild the shards") from None

    def _image(self, sample: dict, data: bytes) -> np.ndarray:
        from PIL import Image

        mode = "RGB" if self.stored_shape[2] == 3 else "L"
        try:
            with Image.open(io.BytesIO(data)) as im:
                arr = np.asarray(im.convert(mode))
        except Exception as e:
            raise DataError(f"{self._where(sample)}: '{self.field}' is not a readable image ({e}); "
                            "rebuild the shards") from None
        arr = arr.reshape(arr.shape[:2] + (-1,))
        if arr.shape != self.stored_shape:
            raise DataError(f"{self._where(sample)}: image is {arr.shape[1]}x{arr.shape[0]}, the manifest says "
                            f"{self.stored_shape[1]}x{self.stored_shape[0]}; rebuild the shards")
        return arr

    def batch(self, xs: list[np.ndarray], uint8_images: bool = False) -> torch.Tensor:
        """Stored examples -> float32 (B, *x_shape); with `uint8_images`, images stay as stored, uint8
        (B, H, W, C), for DeviceBatches to convert on the device."""
        if self.kind == "image" and uint8_images:
            return torch.from_numpy(np.stack(xs)) if xs else torch.empty((0, *self.stored_shape), dtype=torch.uint8)
        if not xs:
            return torch.empty((0, *self.x_shape), dtype=torch.float32)
        if self.kind == "image":
            x_BHWC = np.stack(xs)
            x_BCHW = np.divide(x_BHWC.transpose(0, 3, 1, 2), 127.5, dtype=np.float32)
            return torch.from_numpy(np.ascontiguousarray(x_BCHW - np.float32(1.0)))
        if self.kind == "vector":
            return torch.from_numpy(np.stack(xs).astype(np.float32, copy=False))
        x_BV = np.zeros((len(xs), self.x_shape[0]), np.float32)
        for i, bow in enumerate(xs):
            x_BV[i, bow[0]] = bow[1]
        return torch.from_numpy(x_BV)

    def decode(self, samples: list[dict], uint8_images: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for s in samples:
            self.check_fields(s)
            ys.append(self.label(s))
            xs.append(self.x(s))
        return self.batch(xs, uint8_images), torch.tensor(ys, dtype=torch.int64)


def _slim(manifest: dict) -> dict:
    """The manifest without the parts readers never need (indices, vocabulary), for pickling to workers."""
    return {k: v for k, v in manifest.items() if k not in ("split_indices", "vocab", "source", "normalisation")}


def _worker() -> int:
    info = get_worker_info()
    return info.id if info is not None else 0


# ----------------------------------------------------------------------------- training streams


class _TrainStream(IterableDataset):
    """Endless batches of one rank; each DataLoader worker runs its own copy (see the module docstring)."""

    def __init__(self, url: str, manifest: dict, batch_unlabelled: int, batch_labelled: int, seed: int,
                 rank: int, world_size: int, num_workers: int, shuffle_buffer: int, start_step: int,
                 cache_bytes: int, uint8_images: bool = False) -> None:
        self.root, self.manifest = _locate(url)[0], _slim(manifest)
        self.bu, self.bl = batch_unlabelled, batch_labelled
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.workers = max(num_workers, 1)
        self.shuffle_buffer, self.start_step = shuffle_buffer, start_step
        self.cache_bytes, self.uint8_images = cache_bytes, uint8_images
        self._check_sizes()

    def _check_sizes(self) -> None:
        consumers = self.world_size * self.workers
        n_u = _Segments(self.manifest, self.root, self.manifest["unlabelled_stream"]).size
        if self.bu and n_u < consumers:
            raise DataError(f"shards at {self.root}: the unlabelled stream has {n_u} examples, fewer than the "
                            f"{consumers} readers (world_size {self.world_size} x {self.workers} workers); "
                            "use fewer workers")
        if self.bl and self.manifest["splits"].get("labelled", {}).get("count", 0) == 0:
            raise DataError(f"shards at {self.root} have no labelled examples but batch_labelled is {self.bl}; "
                            "rebuild with --num-labelled or set data.batch_labelled to 0")

    def __iter__(self) -> Iterator[dict]:
        physical = _worker()
        worker = (physical + self.start_step) % self.workers  # the worker that made batch start_step + physical
        skip = (self.start_step + physical) // self.workers  # batches this worker made before start_step
        decoder = _Decoder(self.manifest)
        unlabelled = self._unlabelled(worker, skip * self.bu) if self.bu else iter(())
        labelled = self._labelled(worker, skip * self.bl) if self.bl else iter(())
        while True:
            u = [next(unlabelled) for _ in range(self.bu)]
            lab = [next(labelled) for _ in range(self.bl)]
            x_u = decoder.batch([decoder.x(s) for s in u], self.uint8_images)
            x_l, y_l = decoder.decode(lab, self.uint8_images)
            yield {"x_u": x_u, "x_l": x_l, "y_l": y_l}

    def _unlabelled(self, worker: int, skip: int) -> Iterator[dict]:
        """Raw samples of this consumer's part of the unlabelled stream, after the first `skip`."""
        segments = _Segments(self.manifest, self.root, self.manifest["unlabelled_stream"])
        consumer = self.rank * self.workers + worker
        lo, hi = _part(segments.size, consumer, self.world_size * self.workers)
        shards = segments.shards_in(lo, hi)
        per_epoch = hi - lo
        epoch, skip = divmod(skip, per_epoch)
        decoder = _Decoder(self.manifest)
        cache = _PartCache(self.cache_bytes)
        while True:
            rng = random.Random(_seed(self.seed, self.rank, worker, epoch, 0))
            order = rng.sample(shards, len(shards))
            raw = (s for _, shard, first, a, b in order for s in cache.samples(self.root, shard, first, a, b))
            if self.shuffle_buffer > 1:
                raw = wds_filters.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(raw)
            for sample in raw:
                if skip:
                    skip -= 1
                    continue
                decoder.check_fields(sample)
                decoder.label(sample)  # unused here, but a bad label is a bad shard
                yield sample
            epoch += 1

    def _labelled(self, worker: int, skip: int) -> Iterator[dict]:
        """Raw samples of this rank's labelled part, a fresh permutation per epoch, after the first `skip`."""
        info = self.manifest["splits"]["labelled"]
        n = info["count"]
        enough = max(self.bl, int(self.manifest["num_classes"]))
        lo, hi = _part(n, self.rank, self.world_size) if n // self.world_size >= enough else (0, n)
        segments = _Segments(self.manifest, self.root, ["labelled"])
        pool = [s for _, shard, first, a, b in segments.shards_in(lo, hi)
                for _, s in _shard_samples(self.root, shard, first, a, b)]
        decoder = _Decoder(self.manifest)
        for s in pool:
            decoder.check_fields(s)
            decoder.label(s)
        epoch, skip = divmod(skip, len(pool))
        while True:
            rng = np.random.default_rng(_seed(self.seed, self.rank, worker, epoch, 1))
            for i in rng.permutation(len(pool))[skip:]:
                yield pool[i]
            skip = 0
            epoch += 1


class _PartCache:
    """A reader's samples of its shard parts, kept in memory after a first, checked read.

    The first epoch reads each part from its tar file (hash, count and order checked, as always) and
    keeps the raw samples; later epochs replay them, in the same order, without parsing tar headers
    again (most of a small-record stream's cost: about 130 us per tabular row on one core). Parts are
    kept until `budget` bytes of sample payload are held; the rest are read from storage every epoch.
    The batches are the same with or without it."""

    def __init__(self, budget: int) -> None:
        self.budget, self.held = budget, 0
        self.parts: dict[tuple[str, int, int], list[dict]] = {}

    def samples(self, root: str, shard: dict, first: int, lo: int, hi: int) -> Iterator[dict]:
        key = (shard["name"], lo, hi)
        if key in self.parts:
            yield from self.parts[key]
            return
        kept: list[dict] | None = [] if self.held < self.budget else None
        size = 0
        for _, sample in _shard_samples(root, shard, first, lo, hi):
            if kept is not None:
                size += sum(len(v) for k, v in sample.items() if isinstance(v, bytes))
                if self.held + size > self.budget:
                    kept = None
                else:
                    kept.append(sample)
            yield sample
        if kept is not None:  # the whole part was read and its shard's sha256 matched
            self.parts[key] = kept
            self.held += size


def _loader(dataset: IterableDataset, num_workers: int, seed: int = 0) -> Iterator[dict]:
    """The dataset itself, or a DataLoader over `num_workers` processes. The loader's own generator, seeded
    here, gives its workers their base seed: without one, creating the iterator draws it from the global
    CPU random state, which training's noise shares (and a resumed run creates it at another update)."""
    if num_workers == 0:
        yield from dataset
        return
    generator = torch.Generator().manual_seed(seed)
    yield from DataLoader(dataset, batch_size=None, num_workers=num_workers, prefetch_factor=4, generator=generator)


def train_batches(url: str, *, batch_unlabelled: int, batch_labelled: int, seed: int, rank: int = 0,
                  world_size: int = 1, num_workers: int = 0, shuffle_buffer: int = 1000,
                  start_step: int = 0, cache_mb: int = 1024, uint8_images: bool = False) -> Iterator[dict]:
    """Endless training batches for one rank: {"x_u": (Bu, *x_shape), "x_l": (Bl, *x_shape), "y_l": (Bl,)}.

    x_u and x_l are float32, y_l int64; a batch size of 0 gives an empty tensor of the right trailing
    shape. With `uint8_images`, image batches are uint8 (B, H, W, C) as stored instead, for DeviceBatches.
    Resuming with start_step=k yields exactly the batches k, k+1, ... of the uninterrupted stream
    with the same arguments (see the module docstring for the cost)."""
    if batch_unlabelled < 0 or batch_labelled < 0 or batch_unlabelled + batch_labelled == 0:
        raise DataError(f"batch sizes unlabelled={batch_unlabelled}, labelled={batch_labelled}: both must be "
                        ">= 0 and not both 0")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside [0, world_size={world_size})")
    if num_workers < 0 or start_step < 0:
        raise DataError(f"num_workers ({num_workers}) and start_step ({start_step}) must be >= 0")
    if cache_mb < 0:
        raise DataError(f"cache_mb is {cache_mb}: use >= 0 (0 reads every epoch from storage)")
    stream = _TrainStream(url, read_manifest(url), batch_unlabelled, batch_labelled, seed, rank, world_size,
                          num_workers, shuffle_buffer, start_step, cache_mb << 20, uint8_images)
    return _loader(stream, num_workers, _seed(seed, rank, 2))


# ----------------------------------------------------------------------------- on the device


# Byte b as the model sees it, b / 127.5 - 1 in float32, computed once by the host path's own numpy
# expression (_Decoder.batch). A table lookup on the device gives these exact values; dividing there
# would not always (CUDA divides a tensor by a scalar as a product with its reciprocal: one bit off).
_BYTE_TO_UNIT = np.divide(np.arange(256, dtype=np.uint8), 127.5, dtype=np.float32) - np.float32(1.0)


class DeviceBatches:
    """Training batches on `device`, the next one already on its way while the caller's step runs.

        stream = DeviceBatches(train_batches(url, ..., uint8_images=True), device, memory_format)
        batch = next(stream)  # on the device; its successor is being copied

    Each next() hands over the batch prepared during the previous step and starts the one after: on CUDA
    the host batch is pinned, copied on a side stream (non-blocking, so the step's kernels keep running),
    and its uint8 images become the model's float32 (B, C, H, W) there, by table lookup, in
    `memory_format`; the caller's stream then waits for that copy alone, not for the host. On CPU the same
    path runs without pinning or streams. uint8 (B, H, W, C) tensors are images; float32 images are only
    put in `memory_format`; everything else is moved as it is.

    The batches, their order and their values are the host path's (train_batches without uint8_images,
    then copied), bit for bit (tests/test_data.py), so resuming works as for train_batches (start_step).
    A batch is read one step early; an error of the stream (a DataError) is raised by the next() that would
    have returned that batch, as without read-ahead."""

    def __init__(self, batches: Iterator[dict], device: torch.device | str,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self.batches = iter(batches)
        self.device, self.memory_format = torch.device(device), memory_format
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.byte_to_unit = torch.from_numpy(_BYTE_TO_UNIT).to(self.device)
        self.ahead = self._send()

    def __iter__(self) -> DeviceBatches:
        return self

    def __next__(self) -> dict:
        ahead = self.ahead
        if ahead is None:
            raise StopIteration
        if isinstance(ahead, Exception):
            self.ahead = None
            raise ahead
        batch, ready = ahead
        if ready is not None:  # the step's stream waits for the copy (on the device; the host goes on)
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ready)
            for x in batch.values():
                x.record_stream(stream)  # made on the side stream: not reused before the step is done with it
        self.ahead = self._send()
        return batch

    def _send(self) -> tuple[dict, torch.cuda.Event | None] | Exception | None:
        """The next host batch, started on its way: (device batch, event of its arrival), or the stream's
        error, or None at its end."""
        try:
            host = next(self.batches)
        except StopIteration:
            return None
        except Exception as e:  # raised in order, by the next() that would have returned this batch
            return e
        if not self.cuda:
            return {k: self._to_model(x.to(self.device)) for k, x in host.items()}, None
        with torch.cuda.stream(self.copy_stream):
            batch = {k: self._to_model(x.pin_memory().to(self.device, non_blocking=True)) for k, x in host.items()}
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        return batch, ready

    def _to_model(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return x
        if x.dtype == torch.uint8:  # (B, H, W, C) as stored: channels_last is this layout, seen as (B, C, H, W)
            x = self.byte_to_unit[x.int()].permute(0, 3, 1, 2)
        return x.contiguous(memory_format=self.memory_format)


# ----------------------------------------------------------------------------- evaluation


class _EvalStream(IterableDataset):
    """One pass over this consumer's contiguous part of a split, in order."""

    def __init__(self, url: str, manifest: dict, split: str, batch_size: int, rank: int, world_size: int,
                 num_workers: int) -> None:
        self.root, self.manifest, self.split = _locate(url)[0], _slim(manifest), split
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.workers = max(num_workers, 1)

    def __iter__(self) -> Iterator[dict]:
        segments = _Segments(self.manifest, self.root, [self.split])
        consumer = self.rank * self.workers + _worker()
        lo, hi = _part(segments.size, consumer, self.world_size * self.workers)
        decoder = _Decoder(self.manifest)
        batch: list[tuple[int, dict]] = []
        for _, shard, first, a, b in segments.shards_in(lo, hi):
            for index, sample in _shard_samples(self.root, shard, first, a, b):
                batch.append((index, sample))
                if len(batch) == self.batch_size:
                    yield self._collate(decoder, batch)
                    batch = []
        if batch:
            yield self._collate(decoder, batch)

    @staticmethod
    def _collate(decoder: _Decoder, batch: list[tuple[int, dict]]) -> dict:
        x, y = decoder.decode([s for _, s in batch])
        return {"x": x, "y": y, "idx": torch.tensor([i for i, _ in batch], dtype=torch.int64)}


def eval_batches(url: str, split: str, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0) -> Iterator[dict]:
    """One pass over `split`: {"x": float32 (B, *x_shape), "y": int64 (B,), "idx": int64 (B,)}, where idx
    is the example's index within the split. Across all ranks and workers every example comes exactly
    once; no padding (the last batch of a reader may be short)."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside [0, world_size={world_size})")
    manifest = read_manifest(url)
    _split_info(manifest, split, url)
    return _loader(_EvalStream(url, manifest, split, batch_size, rank, world_size, num_workers), num_workers)
