"""Checkpoints on any fsspec storage (file://, memory://, s3:// with s3fs installed).

Layout under the checkpoint URL:

    step-000200/model.pt        weights of the one module (encoder, generator, prior)
    step-000200/optimizer.pt    optimizer and learning-rate schedule (under DeepSpeed: the schedule only)
    step-000200/deepspeed/...   under DeepSpeed ZeRO: the engine's sharded weights and optimizer state,
                                each process's files as `engine.save_checkpoint` wrote them
    step-000200/rank-00000.pt   one per process: its persistent chains and RNG states
    step-000200/config.yaml     the resolved config
    step-000200/meta.json       step, world size, ZeRO stage, extra state (best validation, NaN skips, ...)
    step-000200/COMPLETE        written last; a directory without it is ignored
    best-000150/...             the weights that scored best on validation, same rule

`model.pt` always holds the full weights (gathered under ZeRO-3), so evaluation and `load_weights`
never need DeepSpeed. A save killed halfway leaves a directory without COMPLETE, so it never looks complete, and the
previous checkpoint stays loadable. Only directories older than the newest complete one are removed.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import uuid
from pathlib import Path

import fsspec
import torch

from ssl_ebm import config as C
from ssl_ebm.runtime import RngState, full_params, zero_stage

MARKER = "COMPLETE"
ENGINE_DIR = "deepspeed"  # the DeepSpeed engine's own files, inside a checkpoint directory
ENGINE_TAG = "state"  # the tag `engine.save_checkpoint` files them under
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
    def write_bytes(self, name: str, filename: str, data: bytes) -> None:
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

    def read_json(self, name: str, filename: str):
        with self.fs.open(self._path(name, filename), "rb") as f:
            return json.loads(f.read())

    def exists(self, name: str, filename: str) -> bool:
        return self.fs.exists(self._path(name, filename))

    # ------------------------------------------------------------------ whole files (large engine shards)
    def upload(self, local: str, name: str, filename: str) -> None:
        """Copy the local file `local` to `<name>/<filename>` (filename may contain '/')."""
        target = self._path(name, filename)
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        self.fs.put_file(local, target)

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

    # ------------------------------------------------------------------ pruning
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
        for name in doomed:
            self.fs.rm(self._path(name), recursive=True)


def resolve_resume(store: CheckpointStore, resume: str) -> tuple[CheckpointStore, str] | None:
    """Which checkpoint to resume from: `auto` (newest complete, if any), `never`, or a URL."""
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
    return other, name


# ----------------------------------------------------------------------------- training state


def save_training_state(store: CheckpointStore, name: str, acc, model, optimizer, scheduler, bank, cfg,
                        meta: dict) -> None:
    """Every rank writes its chains and RNG states (and, under DeepSpeed, its engine shards); the main
    process then writes the full weights, schedule, config and meta, and COMPLETE last.

    A collective: every rank calls it.
    """
    rank_state = {"rng": RngState.capture().to_dict(), "bank": bank.state_dict() if bank else None}
    store.write_torch(name, f"rank-{acc.process_index:05d}.pt", rank_state)
    stage = zero_stage(acc)
    if stage:
        _save_engine(store, name, model)
    weights = _full_state_dict(acc, model)
    acc.wait_for_everyone()  # every rank's files are written before COMPLETE
    if acc.is_main_process:
        store.write_torch(name, "model.pt", weights)
        store.write_torch(name, "optimizer.pt", {"optimizer": None if stage else optimizer.state_dict(),
                                                 "scheduler": scheduler.state_dict()})
        store.write_bytes(name, "config.yaml", C.dump_config(cfg).encode())
        store.write_json(name, "meta.json", {**meta, "world_size": acc.num_processes, "zero_stage": stage})
        store.mark_complete(name)
        kind = name.split("-")[0]
        store.prune(kind, cfg.train.keep_last if kind == "step" else 1)
    acc.wait_for_everyone()


def load_training_state(store: CheckpointStore, name: str, acc, model, optimizer, scheduler, bank) -> dict:
    """Restore what `save_training_state` wrote; returns its meta (step, best validation, ...)."""
    meta = store.read_json(name, "meta.json")
    saved, here = (meta.get("zero_stage", 0), meta["world_size"]), (zero_stage(acc), acc.num_processes)
    if (saved[0] or here[0]) and saved != here:
        raise CheckpointError(
            f"{store.url_of(name)} was saved by {saved[1]} process(es) with {_describe(saved[0])}; this run has "
            f"{here[1]} with {_describe(here[0])}. DeepSpeed's sharded optimizer state resumes only as it was "
            "saved: launch with the same accelerate config and process count, or start a new run with "
            "train.resume=never (and train.checkpoint_dir elsewhere)")
    opt = store.read_torch(name, "optimizer.pt")
    if here[0]:
        _load_engine(store, name, model)
        scheduler.load_state_dict(opt["scheduler"])
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr  # the schedule's rate for the next step, whatever the engine restored
    else:
        acc.unwrap_model(model).load_state_dict(store.read_torch(name, "model.pt"))
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
    rank_file = f"rank-{acc.process_index:05d}.pt"
    if store.exists(name, rank_file) and meta["world_size"] == acc.num_processes:
        state = store.read_torch(name, rank_file)
        if bank is not None and state["bank"] is not None:
            bank.load_state_dict(state["bank"])
        RngState.from_dict(state["rng"]).restore()
    else:
        acc.print(f"note: {store.url_of(name)} was saved by {meta['world_size']} processes, this run has "
                  f"{acc.num_processes}: weights and optimizer resume, chains and RNG start fresh")
    return meta


def _describe(stage: int) -> str:
    return f"DeepSpeed ZeRO-{stage}" if stage else "DDP (no DeepSpeed)"


def _full_state_dict(acc, model) -> dict | None:
    """The full weights on the main process (None elsewhere); under ZeRO-3 a collective gather."""
    net = acc.unwrap_model(model)
    with full_params(acc, net):
        if not acc.is_main_process:
            return None
        return {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}


def _save_engine(store: CheckpointStore, name: str, engine) -> None:
    """DeepSpeed writes each rank's shards to local disk (a collective); every rank uploads its own files.

    A local temporary directory per rank, so nodes need no shared file system ($TMPDIR picks the disk).
    """
    with tempfile.TemporaryDirectory(prefix="ssl_ebm_zero_") as tmp:
        engine.save_checkpoint(tmp, tag=ENGINE_TAG, save_latest=False)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                store.upload(str(path), name, f"{ENGINE_DIR}/{path.relative_to(tmp).as_posix()}")


def _load_engine(store: CheckpointStore, name: str, engine) -> None:
    """Every rank fetches the engine files (DeepSpeed reads other ranks' shards too) and loads them."""
    with tempfile.TemporaryDirectory(prefix="ssl_ebm_zero_") as tmp:
        if store.download_tree(name, ENGINE_DIR, tmp) == 0:
            raise CheckpointError(f"{store.url_of(name)}/{ENGINE_DIR}/ is missing or empty; the checkpoint is "
                                  "damaged: delete it or resume from another")
        path, _ = engine.load_checkpoint(tmp, tag=ENGINE_TAG, load_module_strict=True, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {store.url_of(name)}/{ENGINE_DIR}/; the checkpoint "
                                  "is damaged: delete it or resume from another")


def load_weights(url: str) -> dict:
    """The model state dict of a checkpoint directory URL (for evaluation and prediction)."""
    parent, name = url.rstrip("/").rsplit("/", 1)
    store = CheckpointStore(parent)
    if not store.exists(name, MARKER):
        raise CheckpointError(f"{url!r} is not a complete checkpoint (no {MARKER} file)")
    return store.read_torch(name, "model.pt")
