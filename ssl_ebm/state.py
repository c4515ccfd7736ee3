"""The training state: everything a checkpoint holds, in one object that saves and loads itself.

    state = TrainingState.create(cfg, acc)     model, chains, optimizer, schedule; prepared
    state.save(store, "step", 200, **extra)    a collective: every rank calls it
    state.resume(store, name)                  weights, optimizer, schedule, chains, RNG, counters
    state.roll_back(store, point, newer)       the watchdog's "back to the last good state"

What one checkpoint directory holds (the files are the store's business, checkpoint.py):

    model.pt         full weights of the one module (gathered under ZeRO-3); in best-* under train.ema_decay,
                     the averaged weights (the ones validated, and tested at the end)
    ema.pt           under train.ema_decay: the moving average of the weights (ssl_ebm/ema.py)
    optimizer.pt     optimizer (None under DeepSpeed: the engine's files hold it) and LR schedule
    deepspeed/...    under ZeRO: every rank's engine shards, as `engine.save_checkpoint` wrote them
    rank-00000.pt    one per process: its persistent chains and RNG states
    config.yaml      the resolved config
    meta.json        the counters (step, best validation, NaN skips, recoveries, ...), the micro-batches each
                     process's data stream had read (batches_read), world size, ZeRO stage

The schedule is a LambdaLR stepped once per optimizer update; its factor is `lr_factor`.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from ssl_ebm import config as C
from ssl_ebm import runtime
from ssl_ebm.checkpoint import CheckpointError, CheckpointStore
from ssl_ebm.ema import WeightAverage
from ssl_ebm.graph import GraphMemory
from ssl_ebm.health import TrainingError
from ssl_ebm.langevin import ChainBank
from ssl_ebm.model import LatentEBM
from ssl_ebm.resume import check_model_config, load_pooled_rank_state, prune_best

ENGINE_DIR = "deepspeed"  # the DeepSpeed engine's own files, inside a checkpoint directory
ENGINE_TAG = "state"  # the tag the engine files them under


def lr_factor(optim: C.OptimConfig, steps: int):
    """The schedule's factor at update `step`: linear warm-up, then constant or cosine to zero."""
    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "cosine":
            t = (step - optim.warmup_steps) / max(1, steps - optim.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        return 1.0

    return factor


def new_counters() -> dict:
    return {"step": 0, "best_val": -1.0, "best_step": -1, "nan_skips": 0, "recoveries": 0, "data_offset": 0}


@dataclass
class TrainingState:
    """Model (as prepared: DDP wrapper or DeepSpeed engine), optimizer, schedule, chain bank, counters;
    the RNG states are captured at save time. `cfg` is the resolved config written with every save."""

    acc: Any
    model: Any
    optimizer: Any
    scheduler: Any
    bank: ChainBank | None
    cfg: C.Config
    counters: dict = field(default_factory=new_counters)
    elastic: str | None = None  # what the last load did with chains saved by another process count
    ema: WeightAverage | None = None  # train.ema_decay > 0: the weights' moving average, for evaluation
    teacher: GraphMemory | None = None  # model.pseudo_label_weight: the graph last built (the same on every rank)

    @classmethod
    def create(cls, cfg: C.Config, acc, memory_format=torch.contiguous_format) -> "TrainingState":
        """Identical initial weights on every rank (seeded by train.seed), then per-rank noise. The weights take
        `memory_format` (channels_last for image nets on GPU), except under DeepSpeed, whose engine needs them
        contiguous."""
        runtime.seed_everything(cfg.train.seed)
        model = LatentEBM(cfg.model)
        bank = None
        if cfg.train.method == "ebm" and cfg.sampler.persistent:
            bank = ChainBank(cfg.sampler.bank_size, cfg.model.z_dim, cfg.model.sigma0, device=acc.device,
                             seed=cfg.train.seed * 100_003 + acc.process_index)
        if not runtime.uses_deepspeed(acc):  # DeepSpeed broadcasts and flattens parameters as contiguous bytes
            model = model.to(memory_format=memory_format)
        optimizer = torch.optim.Adam(model.param_groups(cfg.optim), betas=cfg.optim.betas,
                                     weight_decay=cfg.optim.weight_decay,  # fused: one kernel per group on GPU
                                     fused=acc.device.type == "cuda" and not runtime.uses_deepspeed(acc))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.optim, cfg.train.steps))
        model, optimizer = acc.prepare(model, optimizer)
        runtime.seed_everything(cfg.train.seed * 7919 + acc.process_index + 1)  # per-rank noise
        ema = None
        if cfg.train.ema_decay > 0:
            if runtime.zero_stage(acc) == 3:
                raise C.ConfigError("train.ema_decay: the weight average needs every weight on every rank, which "
                                    "ZeRO-3 partitions; set train.ema_decay=0 or use ZeRO-2")
            ema = WeightAverage(acc.unwrap_model(model), cfg.train.ema_decay)
        return cls(acc, model, optimizer, scheduler, bank, cfg, ema=ema)

    @cached_property
    def net(self) -> LatentEBM:
        """The module itself, unwrapped from DDP or the DeepSpeed engine (the same object all run long)."""
        return self.acc.unwrap_model(self.model)

    def batches_read(self, step: int) -> int:
        """The micro-batches each process's data stream has yielded by update `step`: where the stream starts
        when the run goes on from there, and a checkpoint's `batches_read`. data_offset moves when a resume
        changes the process count or train.grad_accum (ssl_ebm/resume.py)."""
        return step * self.cfg.train.grad_accum + self.counters.get("data_offset", 0)

    # ------------------------------------------------------------------ saving and loading
    def save(self, store: CheckpointStore, kind: str, step: int, **extra) -> str:
        """Write checkpoint `<kind>-<step>`: every rank its chains and RNG (and engine shards), then the main
        process the full weights, schedule, config and counters, COMPLETE last; prunes old ones.

        A directory of that name is removed first: a save replaces it whole. Otherwise files of an unfinished
        save into it (another run's, killed mid-save, say with two processes, ZeRO or an average) that this
        save does not write (rank-00001.pt, deepspeed/..., ema.pt) would sit in a complete checkpoint."""
        acc, name = self.acc, store.dir_name(kind, step)
        if acc.is_main_process:
            store.remove([name])
        acc.wait_for_everyone()
        rank_state = {"rng": runtime.RngState.capture().to_dict(),
                      "bank": self.bank.state_dict() if self.bank else None}
        store.write_torch(name, rank_file(acc.process_index), rank_state)
        stage = runtime.zero_stage(acc)
        if stage:
            with tempfile.TemporaryDirectory(prefix="ssl_ebm_zero_") as tmp:  # local disk: no shared FS needed
                runtime.save_engine(self.model, tmp, ENGINE_TAG)
                store.upload_tree(tmp, name, ENGINE_DIR)
        weights = self._full_state_dict()
        acc.wait_for_everyone()  # every rank's files are written before COMPLETE
        if acc.is_main_process:
            store.write_torch(name, "model.pt", weights)
            store.write_torch(name, "optimizer.pt", {"optimizer": None if stage else self.optimizer.state_dict(),
                                                     "scheduler": self.scheduler.state_dict()})
            if self.ema is not None:
                store.write_torch(name, "ema.pt", self.ema.state_dict())
            if self.teacher is not None:
                store.write_torch(name, "graph.pt", self.teacher.state_dict())
            store.write_bytes(name, "config.yaml", C.dump_config(self.cfg).encode())
            # where each process's data stream stands (micro-batches), whatever grad_accum a resume uses
            meta = {**self.counters, "step": step, "batches_read": self.batches_read(step), **extra}
            store.write_json(name, "meta.json", {**meta, "world_size": acc.num_processes, "zero_stage": stage})
            store.mark_complete(name)
            if kind == "step":
                store.prune(kind, self.cfg.train.keep_last)
            else:
                prune_best(store)
        acc.wait_for_everyone()
        return name

    def load(self, store: CheckpointStore, name: str) -> dict:
        """Restore what `save` wrote into this state (the counters excepted); returns the saved meta."""
        acc = self.acc
        meta = store.read_json(name, "meta.json")
        check_model_config(store, name, self.cfg)
        saved, here = (meta.get("zero_stage", 0), meta["world_size"]), (runtime.zero_stage(acc), acc.num_processes)
        if saved[0] != here[0]:
            raise CheckpointError(_zero_refusal(store.url_of(name), saved[0], here[0]))
        opt = store.read_torch(name, "optimizer.pt")
        if here[0]:
            self._load_engine(store, name, universal=saved[1] != here[1])
            self.scheduler.load_state_dict(opt["scheduler"])
            for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
                group["lr"] = lr  # the schedule's rate for the next step, whatever the engine restored
        else:
            self.net.load_state_dict(store.read_torch(name, "model.pt"))
            self.optimizer.load_state_dict(opt["optimizer"])
            self.scheduler.load_state_dict(opt["scheduler"])
        if self.ema is not None:  # a checkpoint saved without an average starts one from its weights
            if store.exists(name, "ema.pt"):
                self.ema.load_state_dict(store.read_torch(name, "ema.pt"))
            else:
                self.ema.reset(self.net)
        mc = self.cfg.model  # the pseudo-labels' graph as it was at the save (none before pseudo_label_start)
        self.teacher = GraphMemory.from_state_dict(store.read_torch(name, "graph.pt"), mc.graph_neighbours,
                                                   mc.graph_smoothing) if store.exists(name, "graph.pt") else None
        self._load_rank_state(store, name, meta["world_size"], meta["step"])
        if here[0] and saved[1] != here[1]:
            self.elastic += f", ZeRO-{here[0]} weights and optimizer state through DeepSpeed's universal checkpoint"
        return meta

    def averaged(self):
        """A context with the averaged weights in the model (train.ema_decay), or the trained ones as they are."""
        return self.ema.applied(self.net) if self.ema is not None else contextlib.nullcontext()

    def resume(self, store: CheckpointStore, name: str) -> int:
        """Continue from checkpoint `name`: everything `load` restores, and its counters; returns the step."""
        self.counters = self.load(store, name)
        return self.counters["step"]

    def roll_back(self, store: CheckpointStore, name: str, newer: list[str]) -> dict:
        """Back to the good checkpoint `name`: the checkpoints in `newer` (the timeline that failed) are
        removed first, nothing accumulated survives, and every chain starts again from p0 (runaway chains
        would drag the prior off again). A collective; returns the restored checkpoint's meta."""
        if self.acc.is_main_process:
            store.remove(newer)
        self.acc.wait_for_everyone()
        runtime.clear_grads(self.acc, self.model)  # the failed window's partial sums (zero_grad skips them)
        saved = self.load(store, name)
        if self.bank is not None:
            self.bank.reinit(1.0)
        return saved

    def _load_rank_state(self, store: CheckpointStore, name: str, world_size: int, step: int) -> None:
        """This rank's chains and RNG states; saved by another process count (DDP), every old rank's chains
        pooled and split, the RNGs reseeded (resume.load_pooled_rank_state)."""
        self.elastic = None
        if world_size != self.acc.num_processes:
            self.elastic = load_pooled_rank_state(self, store, name, world_size, step)
            return
        state = store.read_torch(name, rank_file(self.acc.process_index))
        if self.bank is not None and state["bank"] is not None:
            self.bank.load_state_dict(state["bank"])
        runtime.RngState.from_dict(state["rng"]).restore()

    def _full_state_dict(self) -> dict | None:
        """The full weights on the main process (None elsewhere); under ZeRO-3 a collective gather."""
        net = self.net
        with runtime.full_params(self.acc, net):
            if not self.acc.is_main_process:
                return None
            return {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}

    def _load_engine(self, store: CheckpointStore, name: str, universal: bool = False) -> None:
        """Every rank fetches all engine files (DeepSpeed reads other ranks' shards too) and loads them; saved by
        another process count (`universal`), through DeepSpeed's universal checkpoint (runtime.load_engine)."""
        url = f"{store.url_of(name)}/{ENGINE_DIR}/"
        with tempfile.TemporaryDirectory(prefix="ssl_ebm_zero_") as tmp:
            if store.download_tree(name, ENGINE_DIR, tmp) == 0:
                raise CheckpointError(f"{url} is missing or empty; the checkpoint is damaged: delete it or resume "
                                      "from another")
            try:
                loaded = runtime.load_engine(self.model, tmp, ENGINE_TAG, universal=universal)
            except Exception as e:  # noqa: BLE001 - DeepSpeed's converter fails with asserts and KeyErrors
                if not universal:
                    raise
                raise CheckpointError(f"DeepSpeed could not convert {url} to its universal checkpoint for another "
                                      f"process count ({type(e).__name__}: {e}); resume with the process count it "
                                      "was saved by, or resume from another checkpoint") from None
            if not loaded:
                raise CheckpointError(f"DeepSpeed could not load {url}; the checkpoint is damaged: delete it or "
                                      "resume from another")

    # ------------------------------------------------------------------ the learning-rate schedule
    def prior_groups(self) -> list[int]:
        groups = [i for i, g in enumerate(self.optimizer.param_groups) if g.get("name") == "prior"]
        if not groups:
            raise TrainingError("the optimizer has no parameter group named 'prior' (see LatentEBM.param_groups)")
        return groups

    def prior_lr(self) -> float:
        """The prior's base rate (before the schedule's factor)."""
        return self.scheduler.base_lrs[self.prior_groups()[0]]

    def set_prior_lr(self, lr: float) -> None:
        """The prior's base rate and its current rate, until the next step of the schedule or a load."""
        for i in self.prior_groups():
            self.scheduler.base_lrs[i] = lr
            self.scheduler.optimizer.param_groups[i]["lr"] = lr

    def scale_prior_lr(self, factor: float) -> None:
        """Multiply the prior's base rate (the schedule's factor still applies)."""
        for i in self.prior_groups():
            self.scheduler.base_lrs[i] *= factor

    def set_schedule_position(self, step: int) -> None:
        """Put the schedule at update `step` with its current base rates (after a roll-back the loop's
        step count goes on: the skipped and rolled-back steps still count)."""
        s = self.scheduler
        s.last_epoch = step
        for group, base, factor in zip(s.optimizer.param_groups, s.base_lrs, s.lr_lambdas):
            group["lr"] = base * factor(step)
        s._last_lr = [g["lr"] for g in s.optimizer.param_groups]


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def _zero_refusal(url: str, saved: int, here: int) -> str:
    """Why a checkpoint of another ZeRO stage (0: DDP) cannot resume here, and what to do. Another process count
    under the same stage resumes (through DeepSpeed's universal checkpoint)."""
    return (f"{url} was saved with {_describe(saved)}; this run has {_describe(here)}. The optimizer state "
            "resumes only under the ZeRO stage it was saved with: launch with the same accelerate config (the process "
            "count may differ); or start a new run with train.resume=never (and train.checkpoint_dir elsewhere)")


def _describe(stage: int) -> str:
    return f"DeepSpeed ZeRO-{stage}" if stage else "DDP (no DeepSpeed)"
