"""What a run leaves in its run directory: the JSONL log, metrics.json and PNG image grids.

Everything is written through fsspec, so the run directory can be local, memory:// or a bucket.
Scalars also go to Accelerate's trackers (TensorBoard) from the training loop.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile

import fsspec
import numpy as np
import torch
from einops import rearrange


def tensorboard_dir(out_dir: str) -> str:
    """TensorBoard writes to local disk: the run directory when it is local, else a temporary one."""
    if "://" not in out_dir or out_dir.startswith("file://"):
        return os.path.join(out_dir.removeprefix("file://"), "tensorboard")
    return tempfile.mkdtemp(prefix="ssl_ebm_tb_")


class JsonlLog:
    """An append-only JSONL file; rewritten whole on flush, since object stores cannot append."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.path = fsspec.core.url_to_fs(url)
        self.lines: list[str] = []
        if self.fs.exists(self.path):  # a resumed run keeps what was logged before
            with self.fs.open(self.path, "r") as f:
                self.lines = [ln.rstrip("\n") for ln in f if ln.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (written after the checkpoint a resumed run starts from)."""
        self.lines = [ln for ln in self.lines if json.loads(ln).get("step", 0) <= step]

    def write(self, record: dict) -> None:
        self.lines.append(json.dumps(record, sort_keys=True))

    def flush(self) -> None:
        with self.fs.open(self.path, "w") as f:
            f.write("\n".join(self.lines) + ("\n" if self.lines else ""))


def write_text(url: str, text: str) -> None:
    with fsspec.open(url, "w") as f:
        f.write(text)


def write_json(url: str, obj) -> None:
    write_text(url, json.dumps(obj, indent=2, sort_keys=True))


def image_grid(x_BCHW: torch.Tensor, nrow: int | None = None) -> np.ndarray:
    """Images in [-1, 1] -> one uint8 grid (H*rows, W*cols, C) with a 1-pixel border."""
    x = x_BCHW.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu()
    b = x.shape[0]
    nrow = nrow or max(1, int(math.ceil(math.sqrt(b))))
    rows = int(math.ceil(b / nrow))
    pad = rows * nrow - b
    if pad:
        x = torch.cat([x, torch.zeros((pad, *x.shape[1:]), dtype=x.dtype)])
    x = torch.nn.functional.pad(x, (1, 1, 1, 1), value=255)
    return rearrange(x, "(r c) ch h w -> (r h) (c w) ch", r=rows, c=nrow).numpy()


def save_png(url: str, grid_HWC: np.ndarray) -> None:
    from PIL import Image

    img = Image.fromarray(grid_HWC[..., 0] if grid_HWC.shape[-1] == 1 else grid_HWC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    with fsspec.open(url, "wb") as f:
        f.write(buf.getvalue())
