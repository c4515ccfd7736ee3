"""The checkpoint store: named checkpoint directories of files on any fsspec storage (file://, memory://,
s3:// with s3fs installed). It knows files, not training: what a checkpoint holds is state.py's.

Layout under the checkpoint URL:

    step-000200/...             a checkpoint of the run at step 200 (its files: ssl_ebm/state.py)
    step-000200/COMPLETE        written last; a directory without it is ignored
    best-000150/...             the weights that scored best on validation, same rule

`model.pt` always holds the full weights (gathered under ZeRO-3), so evaluation and `load_weights`
never need DeepSpeed. A save killed halfway leaves a directory without COMPLETE, so it never looks complete, and the
previous checkpoint stays loadable. Only directories older than the newest complete one are pruned.

The marker goes first and comes last: a save into a directory that exists (a best-N written again, a save
repeated after a resume) deletes its COMPLETE before the first file is replaced, and a delete removes COMPLETE
before anything else, so a directory is complete only while every file in it is the one its save wrote.
"""

from __future__ import annotations

import io
import json
import os
import re
import uuid
from pathlib import Path

import fsspec
import torch

MARKER = "COMPLETE"
_STEP_RE = re.compile(r"^(step|best)-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint location or file that cannot be used; the message says what to do."""


class CheckpointStore:
    """Save, list, load and prune checkpoints under one fsspec URL."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as e:
            raise CheckpointError(f"checkpoint location {url!r} cannot be opened: {e}") from None
        self.root = self.root.rstrip("/")

    # ------------------------------------------------------------------ paths
    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def dir_name(self, kind: str, step: int) -> str:
        return f"{kind}-{step:06d}"

    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}"

    # ------------------------------------------------------------------ checks
    def check_writable(self) -> None:
        """Fail before training starts if nothing can be written here."""
        probe = self._path(f".write-probe-{uuid.uuid4().hex}")
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            with self.fs.open(probe, "wb") as f:
                f.write(b"ok")
            self.fs.rm(probe)
        except Exception as e:  # noqa: BLE001 - any storage error means the same to the user
            raise CheckpointError(
                f"checkpoint location {self.url!r} is not writable ({type(e).__name__}: {e}); "
                "set train.checkpoint_dir (or train.out_dir) to a location you can write") from None

    # ------------------------------------------------------------------ writing
    def _unmark(self, name: str) -> None:
        """Delete `name`'s COMPLETE if it has one. Before every file written into a directory (by any process:
        each writes its own files, all before the marker), so that it never looks complete while its files
        are replaced; one existence check per file, small beside the file itself."""
        marker = self._path(name, MARKER)
        self.fs.invalidate_cache(self._path(name))  # s3fs lists from a cache that other processes do not see
        try:
            if self.fs.exists(marker):
                self.fs.rm(marker)
        except FileNotFoundError:  # another process removed it first
            pass

    def write_bytes(self, name: str, filename: str, data: bytes) -> None:
        if filename != MARKER:
            self._unmark(name)
        self.fs.makedirs(self._path(name), exist_ok=True)
        with self.fs.open(self._path(name, filename), "wb") as f:
            f.write(data)

    def write_torch(self, name: str, filename: str, obj) -> None:
        buf = io.BytesIO()
        torch.save(obj, buf)
        self.write_bytes(name, filename, buf.getvalue())

    def write_json(self, name: str, filename: str, obj) -> None:
        self.write_bytes(name, filename, json.dumps(obj, indent=2).encode())

    def mark_complete(self, name: str) -> None:
        """Written last, by one process, after every process's files are in place."""
        self.write_bytes(name, MARKER, b"")

    # ------------------------------------------------------------------ reading
    def complete(self, kind: str = "step") -> list[tuple[int, str]]:
        """(step, name) of every complete checkpoint of `kind`, oldest first."""
        if not self.fs.exists(self.root):
            return []
        out = []
        for entry in self.fs.ls(self.root, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            m = _STEP_RE.match(name)
            if m and m.group(1) == kind and self.fs.exists(self._path(name, MARKER)):
                out.append((int(m.group(2)), name))
        return sorted(out)

    def entries(self) -> list[tuple[str, int, str]]:
        """(kind, step, name) of every checkpoint directory, complete or not, oldest step first."""
        if not self.fs.exists(self.root):
            return []
        names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in self.fs.ls(self.root, detail=False)]
        found = [(m.group(1), int(m.group(2)), name) for name in names if (m := _STEP_RE.match(name))]
        return sorted(found, key=lambda e: (e[1], e[0]))

    def latest(self, kind: str = "step") -> str | None:
        found = self.complete(kind)
        return found[-1][1] if found else None

    def read_torch(self, name: str, filename: str, map_location="cpu"):
        path = self._path(name, filename)
        try:
            with self.fs.open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {self.url_of(name)}/{filename} is missing; "
                                  "the checkpoint is damaged: delete it or resume from another") from None
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)

    def read_text(self, name: str, filename: str) -> str:
        with self.fs.open(self._path(name, filename), "rb") as f:
            return f.read().decode()

    def read_json(self, name: str, filename: str):
        with self.fs.open(self._path(name, filename), "rb") as f:
            return json.loads(f.read())

    def exists(self, name: str, filename: str) -> bool:
        return self.fs.exists(self._path(name, filename))

    # ------------------------------------------------------------------ whole files (large engine shards)
    def upload(self, local: str, name: str, filename: str) -> None:
        """Copy the local file `local` to `<name>/<filename>` (filename may contain '/')."""
        self._unmark(name)
        target = self._path(name, filename)
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        self.fs.put_file(local, target)

    def upload_tree(self, local_dir: str, name: str, folder: str) -> None:
        """Copy every file under the local directory `local_dir` to `<name>/<folder>/`, keeping relative paths."""
        for path in sorted(Path(local_dir).rglob("*")):
            if path.is_file():
                self.upload(str(path), name, f"{folder}/{path.relative_to(local_dir).as_posix()}")

    def download_tree(self, name: str, folder: str, local_dir: str) -> int:
        """Copy every file under `<name>/<folder>` to `local_dir`, keeping relative paths; returns the count."""
        root = self._path(name, folder)
        files = self.fs.find(root) if self.fs.exists(root) else []
        for remote in files:
            rel = remote.rstrip("/")[len(root.rstrip("/")) + 1:] if remote.startswith(root) else remote.rsplit("/", 1)[-1]
            local = os.path.join(local_dir, rel)
            os.makedirs(os.path.dirname(local), exist_ok=True)
            self.fs.get_file(remote, local)
        return len(files)

    # ------------------------------------------------------------------ removing
    def remove(self, names: list[str]) -> None:
        """Delete the checkpoint directories `names`, whole: each one's COMPLETE first, so that a delete cut
        short leaves a directory that no longer looks complete (and is pruned later), never a complete one
        with files missing."""
        for name in names:
            self._unmark(name)
            if self.fs.exists(self._path(name)):
                self.fs.rm(self._path(name), recursive=True)

    def prune(self, kind: str, keep: int) -> None:
        """Keep the newest `keep` complete checkpoints of `kind`; drop older ones and dead partial saves."""
        found = self.complete(kind)
        if not found:
            return
        newest = found[-1][0]
        doomed = {name for _, name in found[:-keep]} if keep > 0 else set()
        for entry in self.fs.ls(self.root, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            m = _STEP_RE.match(name)
            if m and m.group(1) == kind and int(m.group(2)) < newest and not self.fs.exists(self._path(name, MARKER)):
                doomed.add(name)
        self.remove(sorted(doomed))


def resolve_resume(store: CheckpointStore, resume: str, allow_pickle: bool = False) -> tuple[CheckpointStore, str] | None:
    """Which checkpoint to resume from: `auto` (newest complete, if any), `never`, or a URL.

    A checkpoint's .pt files are torch pickles (read with weights_only=False: the RNG states hold numpy
    arrays, and DeepSpeed's engine files are its own pickles), and unpickling runs any code a file names. The
    run's own checkpoint directory is trusted as the place it writes to; a URL elsewhere is read only with
    `allow_pickle` (train.allow_pickle), the rule of `ssl_ebm.load`."""
    if resume == "never":
        return None
    if resume == "auto":
        name = store.latest("step")
        return (store, name) if name else None
    url = resume.rstrip("/")
    parent, name = url.rsplit("/", 1)
    other = CheckpointStore(parent)
    if not other.exists(name, MARKER):
        raise CheckpointError(f"train.resume={resume!r} is not a complete checkpoint (no {MARKER} file); "
                              "use resume=auto, resume=never, or the URL of a complete step-NNNNNN directory")
    if other.url != store.url and not allow_pickle:
        raise CheckpointError(f"train.resume={url} is a checkpoint outside this run's checkpoint directory "
                              f"({store.url}): its .pt files are pickles, and unpickling one runs any code it names. "
                              "Set train.allow_pickle=true to resume from a checkpoint you trust, or copy it into "
                              "train.checkpoint_dir and use train.resume=auto")
    return other, name


def load_weights(url: str) -> dict:
    """The model state dict of a checkpoint directory URL (for evaluation and prediction)."""
    parent, name = url.rstrip("/").rsplit("/", 1)
    store = CheckpointStore(parent)
    if not store.exists(name, MARKER):
        raise CheckpointError(f"{url!r} is not a complete checkpoint (no {MARKER} file)")
    return store.read_torch(name, "model.pt")
