"""The distributed runtime: the only module of the package that imports accelerate, deepspeed or torch.distributed.

Model code is written for one device; this module builds the `Accelerator` (DDP, DeepSpeed ZeRO, or a
single process, as the launcher says), gathers and sums tensors across processes, saves and loads the
DeepSpeed engine's own files, gathers ZeRO-3 parameters, tears the process group down, and answers
"who am I". Elsewhere the accelerator is used through its methods (prepare, backward, wait_for_everyone,
print, log); torchmetrics (metrics.py) synchronises its own states over torch.distributed; outside the
package, launch/slurm/accelerate_launch.py wraps Accelerate's launcher.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from ssl_ebm.config import Config, ConfigError


def _cuda() -> bool:
    return torch.cuda.is_available()


def make_accelerator(cfg: Config, logging_dir: str | None = None):
    """An `Accelerator` for this machine: gloo on CPU (see NOTES.md), NCCL on GPUs.

    Mixed precision comes from `train.mixed_precision` when that says bf16, otherwise from the launcher
    (`accelerate launch --mixed_precision ...`); DeepSpeed comes from the launcher config
    (configs/accelerate/zero*.yaml), and under DeepSpeed bf16 is its torch autocast (fp32 weights).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    deepspeed = launched_with_deepspeed()
    # The supervised baseline leaves the generator without gradients; DDP must not wait for them.
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=cfg.train.method != "ebm")]
    if not _cuda() and local_world()[1] > 1:  # gloo on CPU; with one process there is no group at all
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    kwargs = dict(
        # Accelerate turns DeepSpeed off when told cpu=True; DeepSpeed finds its CPU accelerator itself.
        cpu=not _cuda() and not deepspeed,
        gradient_accumulation_steps=cfg.train.grad_accum,
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,
    )
    if cfg.train.mixed_precision != "no" and not deepspeed:  # DeepSpeed: see _configure_deepspeed
        kwargs["mixed_precision"] = cfg.train.mixed_precision
    if logging_dir is not None and trackers(cfg):
        kwargs["log_with"] = trackers(cfg)
        kwargs["project_dir"] = logging_dir
        if "mlflow" in kwargs["log_with"] and not os.environ.get("MLFLOW_TRACKING_URI"):
            # offline by default: a file store in the run directory (MLflow 3 asks for the opt-in; a database
            # store would need SQLAlchemy: set MLFLOW_TRACKING_URI=sqlite:///... or a server to use one)
            os.environ["MLFLOW_TRACKING_URI"] = Path(logging_dir).resolve().parent.joinpath("mlruns").as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    accelerator = Accelerator(**kwargs)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        _configure_deepspeed(plugin, cfg)
        # DeepSpeed calls torch's older collective names on every step; the warning says nothing to users.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)`",
                                category=FutureWarning)
    elif deepspeed:
        raise ConfigError("the launcher asked for DeepSpeed but Accelerate did not enable it (is ACCELERATE_USE_CPU "
                          "set? unset it: DeepSpeed finds the CPU itself); launch with "
                          "`accelerate launch --config_file configs/accelerate/zero2.yaml ...`")
    return accelerator


def trackers(cfg: Config) -> list[str]:
    """The Accelerate trackers of `train.log_with`, checked: known to Accelerate and installed.

    MLflow without MLFLOW_TRACKING_URI writes to a file store beside the TensorBoard folder (offline).
    """
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    from accelerate.utils import imports

    names = [n.strip() for n in cfg.train.log_with.split(",") if n.strip()]
    if names == ["none"]:
        return []
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"train.log_with: unknown tracker {name!r}; Accelerate supports "
                              f"{', '.join(LOGGER_TYPE_TO_CLASS)} (comma-separated), or none")
        available = getattr(imports, f"is_{name}_available", None)
        if available is not None and not available():
            package = {"mlflow": "mlflow-skinny", "comet_ml": "comet-ml"}.get(name, name)
            raise ConfigError(f"train.log_with: the {name} tracker is not installed; pip install {package}, "
                              "or choose another tracker")
    return names


def launched_with_deepspeed() -> bool:
    """Whether `accelerate launch` was given a DeepSpeed config (it says so in the environment)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _fill(ds: dict, dotted: str, value, source: str) -> None:
    """Set DeepSpeed config key `dotted` to `value` where the JSON says "auto" (or nothing).

    A different explicit value is an error: the run config is the one place these are set.
    """
    *parents, key = dotted.split(".")
    node = ds
    for k in parents:
        node = node.setdefault(k, {})
    if node.get(key, "auto") == "auto":
        node[key] = value
    elif node[key] != value:
        where = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "the DeepSpeed config")
        raise ConfigError(f"{where}: {dotted} is {node[key]!r} but {source} gives {value!r}; "
                          f'set {dotted} to "auto" there (it is then taken from {source})')


def _configure_deepspeed(plugin, cfg: Config) -> None:
    """Fill the DeepSpeed config fields the launcher cannot know: batch size, clipping, autocast.

    DeepSpeed's own bf16/fp16 modes cast the weights, and this model feeds fp32 inputs (and runs the
    Langevin sampler in fp32) outside the engine (NOTES.md); we keep fp32 weights and use DeepSpeed's
    torch autocast instead: `"torch_autocast": {"enabled": "auto"}` follows train.mixed_precision (or
    the launcher's --mixed_precision bf16).
    """
    ds = plugin.deepspeed_config
    where = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "the DeepSpeed config")
    for mode in ("bf16", "fp16"):
        if str(ds.get(mode, {}).get("enabled", False)).lower() == "true":
            raise ConfigError(f"{where}: DeepSpeed's {mode} mode casts the weights, which this model does not "
                              f'support; set "{mode}": {{"enabled": false}} and use train.mixed_precision=bf16 '
                              "(DeepSpeed's torch autocast with fp32 weights)")
    # Per-process batch: DeepSpeed only books it (throughput, train_batch_size); the loss is a per-rank mean.
    micro = cfg.data.batch_labelled + (cfg.data.batch_unlabelled if cfg.train.method == "ebm" else 0)
    _fill(ds, "train_micro_batch_size_per_gpu", micro, "data.batch_unlabelled + data.batch_labelled")
    _fill(ds, "gradient_accumulation_steps", cfg.train.grad_accum, "train.grad_accum")
    _fill(ds, "gradient_clipping", cfg.optim.grad_clip, "optim.grad_clip")  # 0 = off, as in DeepSpeed
    bf16 = cfg.train.mixed_precision == "bf16" or os.environ.get("ACCELERATE_MIXED_PRECISION", "no") == "bf16"
    _fill(ds, "torch_autocast.enabled", bf16, "train.mixed_precision")
    if ds["torch_autocast"]["enabled"]:
        ds["torch_autocast"].setdefault("dtype", "bfloat16")


def shutdown() -> None:
    """Tear the process group down before interpreter exit (idempotent): left to exit, gloo's threads
    can abort a finished process ("terminate called without an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def forget_accelerate_state() -> None:
    """Forget Accelerate's process-wide state: the singletons every `Accelerator` of a process shares hold the
    first one's device, precision and accumulation settings, and refuse a second run that asks for others.
    For several runs in one process, one after another (the scikit-learn estimator's fits, ssl_ebm/sklearn.py)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()


def exit_process(code: int) -> NoReturn:
    """End a launcher-started process with `code` once its work is done and written.

    One of several processes (WORLD_SIZE > 1) leaves at once with os._exit after flushing: even with
    the process group destroyed, gloo's and DeepSpeed's C++ threads met by static destructors at
    interpreter exit can abort a run that has finished ("terminate called without an active
    exception", status -6 instead of 0 or the requeue status). Everything the run writes is closed
    by then (checkpoints, logs, trackers). A single process exits normally.
    """
    shutdown()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    logging.shutdown()
    os._exit(code)


def uses_deepspeed(accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def zero_stage(accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return 0 if plugin is None else int(plugin.zero_stage)


def gather(accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` along dim 0 from every process (same size on each)."""
    return accelerator.gather(tensor.contiguous())


def broadcast_object(accelerator, obj):
    """The main process's `obj` (picklable) on every process; a collective when several run."""
    if accelerator.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj], from_process=0)[0]


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` in place over every process (a collective when several run); returns it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor


def clear_grads(accelerator, model) -> None:
    """Drop every gradient accumulated so far, for real (a roll-back, a skipped update).

    Off the window's last micro-batch Accelerate's `optimizer.zero_grad` does nothing, and under DeepSpeed
    it never does: the engine's ZeRO optimizer holds the partial sums. Those are dropped as DeepSpeed drops
    them itself after an fp16 overflow (stage 1/2: `averaged_gradients`, `all_grad_tensors`; stage 3:
    `averaged_gradients`; with offload, its CPU buffers).
    """
    for p in model.parameters():
        p.grad = None
    if not uses_deepspeed(accelerator):
        return
    opt = model.optimizer  # the engine's (ZeRO) optimizer
    opt.zero_grad(set_to_none=True)  # stage 3: also restarts its micro-step count (the next one copies, not adds)
    if zero_stage(accelerator) == 3:  # stage3.py, _overflow_clean_up
        if opt.offload_optimizer:
            opt.reset_cpu_buffers()
        else:
            opt.averaged_gradients = {}
    elif zero_stage(accelerator):  # stage_1_and_2.py, step() on overflow
        from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

        release = getattr(opt, "_release_preflattened_grad_buffers", None)  # (newer DeepSpeed only)
        if release is not None:
            release()
        if opt.cpu_offload:
            opt.reset_cpu_buffers()
        else:
            for name in ("averaged_gradients", "all_grad_tensors"):  # (partial sums sit in the latter)
                held = getattr(opt, name, {})
                for k in held:
                    held[k] = None
        opt.micro_step_id = INITIAL_MICRO_STEP_ID  # as its step() does: with offload, the CPU sums restart


def save_engine(engine, local_dir: str, tag: str) -> None:
    """DeepSpeed writes this rank's shards of weights and optimizer state under `local_dir` (a collective)."""
    engine.save_checkpoint(local_dir, tag=tag, save_latest=False)


def load_engine(engine, local_dir: str, tag: str, universal: bool = False) -> bool:
    """Load what `save_engine` wrote (every rank's files under `local_dir`); False if DeepSpeed could not.

    `universal`: the files were written by another process count. ZeRO shards the optimizer state (and
    under ZeRO-3 the weights) by rank, and the engine loads shards only on the count that wrote them; so
    DeepSpeed's own converter (deepspeed.checkpoint.ds_to_universal) first rewrites them under
    `local_dir`/universal as one folder per parameter, its fp32 weights and optimizer moments whole, and the
    engine loads that as its `checkpoint.load_universal` setting would, each rank taking its new shard.
    The setting is switched on for this load only: the same engine later loads its own checkpoints as usual.
    """
    if universal:
        local_dir = _convert_to_universal(local_dir, tag)
    config = engine._config  # what `checkpoint.load_universal` in the DeepSpeed JSON sets
    config.load_universal_checkpoint = universal
    try:
        path, _ = engine.load_checkpoint(local_dir, tag=tag, load_module_strict=True, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
    finally:
        config.load_universal_checkpoint = False
    return path is not None


def _convert_to_universal(local_dir: str, tag: str) -> str:
    """ds_to_universal of `local_dir`/`tag` into `local_dir`/universal/`tag`, in this process and quietly (it
    prints its progress); returns `local_dir`/universal. Every rank converts its own copy: no rank needs a file
    system shared with another. Our engine files carry no universal-checkpoint info (that is for tensor- and
    pipeline-parallel models, which this one is not), so it is injected, as the converter's flag allows."""
    import argparse
    import io

    from deepspeed.checkpoint import ds_to_universal

    out = os.path.join(local_dir, "universal")
    args = argparse.Namespace(input_folder=os.path.join(local_dir, tag), output_folder=os.path.join(out, tag),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)
    return out


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
def full_params(accelerator, module, modify: bool = False):
    """Use `module`'s parameters outside the engine's forward (Langevin, evaluation, loading weights).

    Under ZeRO-3 every rank holds only a shard of each parameter; gather them for the duration (a
    collective: every rank enters). With `modify=True`, what rank 0 holds at the end is partitioned back
    (for loading weights). Elsewhere this does nothing.
    """
    if zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0 if modify else None):
            yield
    else:
        yield


class Preemption:
    """SIGTERM and SIGUSR1 (SLURM's warning signal before preemption or the time limit) set a flag.

    Built first thing in launch/train.py's main, so that a signal during start-up (shard building, state
    creation, a resume that downloads engine shards) is remembered, not met by its default action (status
    128 + signal, which the batch scripts do not requeue). The script holds the signals blocked while it
    imports its libraries; installing the handlers unblocks them, and a signal held meanwhile arrives then.
    The run acts on the flag at its first safe point (`loop.stop_if_requested` after start-up, then the
    loop's per-step status gather, which writes a checkpoint) and exits with `EXIT_CODE`, which the SLURM
    scripts take as "requeue me".
    """

    EXIT_CODE = 75  # EX_TEMPFAIL
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, signals=SIGNALS):
        self.signum: int | None = None
        for sig in signals:
            signal.signal(sig, self._handle)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)  # one held since start-up is delivered now

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None
