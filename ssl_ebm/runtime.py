"""The distributed runtime: the only module that touches accelerate, deepspeed or torch.distributed.

Model code is written for one device; this module builds the `Accelerator` (DDP, DeepSpeed ZeRO, or a
single process, as the launcher says), gathers tensors across processes, and answers "who am I".
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
from dataclasses import dataclass

import numpy as np
import torch

from ssl_ebm.config import Config


def _cuda() -> bool:
    return torch.cuda.is_available()


def make_accelerator(cfg: Config, logging_dir: str | None = None):
    """An `Accelerator` for this machine: gloo on CPU (see NOTES.md), NCCL on GPUs.

    Mixed precision comes from `train.mixed_precision` when that says bf16, otherwise from the launcher
    (`accelerate launch --mixed_precision ...`); DeepSpeed comes from the launcher config.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from accelerate.utils import DistributedDataParallelKwargs

    # The supervised baseline leaves the generator without gradients; DDP must not wait for them.
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=cfg.train.method != "ebm")]
    if not _cuda() and local_world()[1] > 1:  # gloo on CPU; with one process there is no group at all
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    kwargs = dict(
        cpu=not _cuda(),
        gradient_accumulation_steps=cfg.train.grad_accum,
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,
    )
    if cfg.train.mixed_precision != "no":
        kwargs["mixed_precision"] = cfg.train.mixed_precision
    if logging_dir is not None:
        kwargs["log_with"] = "tensorboard"
        kwargs["project_dir"] = logging_dir
    accelerator = Accelerator(**kwargs)
    ds = accelerator.state.deepspeed_plugin
    if ds is not None:
        _configure_deepspeed(ds, cfg)
    return accelerator


def _configure_deepspeed(plugin, cfg: Config) -> None:
    """Fill the DeepSpeed config fields the launcher cannot know: batch size, clipping, autocast.

    DeepSpeed's own bf16 mode casts the weights (NOTES.md); we keep fp32 master weights and use its
    torch autocast instead.
    """
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = max(cfg.data.batch_unlabelled, 1)
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum
    if cfg.optim.grad_clip > 0:
        ds["gradient_clipping"] = cfg.optim.grad_clip
    if cfg.train.mixed_precision == "bf16":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
        ds.setdefault("bf16", {})["enabled"] = False


def uses_deepspeed(accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def zero_stage(accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return 0 if plugin is None else int(plugin.zero_stage)


def gather(accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` along dim 0 from every process (same size on each)."""
    return accelerator.gather(tensor.contiguous())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class RngState:
    """Every random-number state one process owns, for bitwise resume."""

    torch_cpu: torch.Tensor
    torch_cuda: list | None
    numpy: tuple
    python: tuple

    @classmethod
    def capture(cls) -> "RngState":
        return cls(
            torch_cpu=torch.get_rng_state(),
            torch_cuda=torch.cuda.get_rng_state_all() if _cuda() else None,
            numpy=np.random.get_state(),
            python=random.getstate(),
        )

    def restore(self) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda is not None and _cuda():
            torch.cuda.set_rng_state_all(self.torch_cuda)
        np.random.set_state(self.numpy)
        random.setstate(self.python)

    def to_dict(self) -> dict:
        return {"torch_cpu": self.torch_cpu, "torch_cuda": self.torch_cuda, "numpy": self.numpy,
                "python": self.python}

    @classmethod
    def from_dict(cls, d: dict) -> "RngState":
        return cls(**d)


def local_world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment, before any Accelerator exists."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@contextlib.contextmanager
def full_params(accelerator, module):
    """Use `module`'s parameters outside the engine's forward (Langevin, evaluation).

    Under ZeRO-3 every rank holds only a shard of each parameter; gather them for the duration.
    Elsewhere this does nothing.
    """
    if zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield
    else:
        yield


class Preemption:
    """SIGTERM and SIGUSR1 (SLURM's warning signal before preemption or the time limit) set a flag.

    The loop checks the flag with its per-step status gather, writes a checkpoint and exits with
    `EXIT_CODE`, which the SLURM scripts take as "requeue me".
    """

    EXIT_CODE = 75  # EX_TEMPFAIL

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.signum: int | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None
