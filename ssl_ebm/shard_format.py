"""The shard format both sides agree on: constants, the manifest's location, DataError.

A leaf: it imports only fsspec. `shards/` writes this format and `ssl_ebm.data` reads it; neither
imports the other for it.
"""

from __future__ import annotations

import fsspec

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("labelled", "unlabelled", "val", "test")
KINDS = ("image", "vector", "counts")
X_FIELDS = {"image": ("npy", "png", "jpg"), "vector": ("npy",), "counts": ("bow.npy",)}
LABEL_FIELD = "cls"
BUILD_HINT = "python -m shards.make --dataset NAME --source PATH --out {url}"


class DataError(ValueError):
    """Bad or missing data (manifest, shard, sample or source file); the message names it and says what to do."""


def locate(url: str) -> tuple[str, str]:
    """(shard directory URL, manifest URL) for a directory URL or a manifest.json URL."""
    url = str(url).rstrip("/")
    if url.endswith(".json"):
        return url.rsplit("/", 1)[0] if "/" in url else ".", url
    return url, f"{url}/{MANIFEST}"


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and path for `url`, or a DataError saying which backend to install."""
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise DataError(f"cannot open {url!r}: {e}. Install that fsspec backend, or fix the URL") from None
