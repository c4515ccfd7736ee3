"""Starting or resuming a run: whose checkpoints are whose, which timeline is live, and resuming on
another process count.

    start_or_resume(state, store, resume)   a fresh run (new run id) or a resumed one; refuses foreign
                                            checkpoints, drops the dead timeline, says what changed
    check_model_config(store, name, cfg)    a checkpoint of another model config: one clear error
    load_pooled_rank_state(state, ...)      elastic resume: every old rank's chains, pooled and split
    best_checkpoint(state, store)           the best-* the teardown tests: this run's, of the live timeline
    prune_best(store)                       keep the newest best-* and the one the newest step-* refers to

Run id. A run that starts fresh draws a random id (on the main process, broadcast); it is kept in the
counters, so every checkpoint's meta.json carries it and a resumed run keeps it. Checkpoints written
before run ids existed have none; a run resumed from one keeps none, and treats those as its own.

Timelines. Resuming from step-S abandons whatever the dead run wrote after S (a crash or a kill between
S and the next step checkpoint): best-N and step-N with N > S, complete or not, are removed before
training continues, so neither the teardown nor a later resume can pick them.

Elastic resume (docs/HEALTH.md, "Resuming on another process count"). A checkpoint saved by N processes
resumes on M: the weights and optimizer are whole in model.pt / optimizer.pt (under ZeRO, the engine's
shards go through DeepSpeed's universal checkpoint: runtime.load_engine); the N rank files'
chain banks are pooled and split; the RNGs are reseeded; the data stream continues at the same point of
its epoch: the N ranks had each read `batches_read` micro-batches (kept in meta.json), so each of the M
continues at batch batches_read * N // M of the M-process stream: the same epoch and the same point in it
(every rank's part shrinks or grows by N / M), though not the same examples (the parts and their shuffles
depend on the rank). The position is counted in micro-batches, never as step x train.grad_accum, which
a resume may change.
"""

from __future__ import annotations

import uuid

import torch
import yaml

from ssl_ebm import config as C
from ssl_ebm import runtime
from ssl_ebm.checkpoint import MARKER, CheckpointError, CheckpointStore, resolve_resume

FIX = ("use another train.checkpoint_dir (or train.out_dir), delete those checkpoints, or set train.resume=auto to "
       "continue that run")


def start_or_resume(state, store: CheckpointStore, resume: str) -> None:
    """Fresh: a new run id, and `store` must hold no complete checkpoint. Resumed (`train.resume` auto or a
    URL): weights, optimizer, chains, RNG and counters (run id included) from the checkpoint; `store` must
    hold no complete checkpoint of another run; the dead timeline after the resumed step is removed."""
    acc = state.acc
    found = resolve_resume(store, resume, state.cfg.train.allow_pickle)
    if found is None:
        refuse_occupied(store, resume)
        state.counters["run_id"] = runtime.broadcast_object(acc, uuid.uuid4().hex[:16])
        return
    source, name = found
    meta_world = source.read_json(name, "meta.json")["world_size"]
    step = state.resume(source, name)
    refuse_foreign(store, state.counters.get("run_id"))
    dropped = drop_dead_timeline(acc, store, step)
    gone = f"; removed the abandoned timeline after step {step}: {', '.join(dropped)}" if dropped else ""
    acc.print(f"resumed from {source.url_of(name)} at step {step}{gone}")
    state.counters["data_offset"] = data_offset(batches_read(state.counters, source, name), step,
                                                state.cfg.train.grad_accum, meta_world, acc.num_processes)
    if meta_world != acc.num_processes:
        acc.print(f"resumed {name} saved by {meta_world} process{'es' if meta_world > 1 else ''} on "
                  f"{acc.num_processes}: {state.elastic}, "
                  f"data position batch {state.batches_read(step)} of the {acc.num_processes}-process "
                  "stream (the same epoch and point in it; other examples than the old ranks would have read), "
                  "RNG reseeded from train.seed, rank and step")


def batches_read(meta: dict, store: CheckpointStore, name: str) -> int:
    """The micro-batches each process's data stream had yielded when checkpoint `name` was written (its
    meta.json's `batches_read`). Not the step times this run's train.grad_accum: a resume may change that
    (8 processes at 1 requeued on 4 at 2), and the position must not move with it. Checkpoints written before
    the count was kept: the step times the grad_accum of their config.yaml, plus the elastic offset."""
    if "batches_read" in meta:
        return int(meta["batches_read"])
    saved = yaml.safe_load(store.read_text(name, "config.yaml")) if store.exists(name, "config.yaml") else None
    accum = int(((saved or {}).get("train") or {}).get("grad_accum", 1))
    return meta["step"] * accum + meta.get("data_offset", 0)


def refuse_occupied(store: CheckpointStore, resume: str) -> None:
    """A fresh run into a directory that already holds complete checkpoints would mix two runs."""
    held = [name for kind in ("step", "best") for _, name in store.complete(kind)]
    if not held:
        return
    shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
    if resume == "never":
        raise CheckpointError(f"train.resume=never {store.url} already holds checkpoints of another run "
                              f"({shown}); {FIX}")
    raise CheckpointError(f"{store.url} holds checkpoints ({shown}) but no step checkpoint to resume from; "
                          "use another train.checkpoint_dir (or train.out_dir), or delete those checkpoints")


def refuse_foreign(store: CheckpointStore, run_id: str | None) -> None:
    """Complete checkpoints of another run id in the directory this run writes to."""
    held = [(kind, name) for kind in ("step", "best") for _, name in store.complete(kind)]
    foreign = [name for kind, name in held if store.read_json(name, "meta.json").get("run_id") != run_id]
    if foreign:
        raise CheckpointError(f"{store.url} holds checkpoints of another run ({', '.join(foreign[:4])}) beside "
                              "those of the run being resumed; move or delete them, so that the two runs' best "
                              "checkpoints cannot be mixed")


def drop_dead_timeline(acc, store: CheckpointStore, step: int) -> list[str]:
    """Remove every step-N / best-N with N > `step`, complete or not (main process); returns their names."""
    dead = [name for _, n, name in store.entries() if n > step]
    acc.wait_for_everyone()  # every rank has read what it needs from the store
    if acc.is_main_process and dead:
        store.remove(dead)
    acc.wait_for_everyone()
    return dead


def check_model_config(store: CheckpointStore, name: str, cfg: C.Config) -> None:
    """The checkpoint's model.* keys (its config.yaml) against this run's: a difference is one clear error,
    not a size-mismatch traceback from load_state_dict (or, worse, weights loaded into another model)."""
    if not store.exists(name, "config.yaml"):
        return
    saved = (yaml.safe_load(store.read_text(name, "config.yaml")) or {}).get("model", {})
    here = yaml.safe_load(C.dump_config(cfg))["model"]
    differ = [f"model.{k}: {saved[k]} there, {here[k]} here"
              for k in sorted(here) if k in saved and saved[k] != here[k]]
    if differ:
        raise CheckpointError(f"checkpoint {store.url_of(name)} was trained with another model config "
                              f"({'; '.join(differ)}); resume with the same model.* values, or start a new run "
                              "with train.resume=never and another train.checkpoint_dir")


# ----------------------------------------------------------------------------- elastic DDP resume


def data_offset(read: int, step: int, grad_accum: int, saved_world: int, world: int) -> int:
    """The data stream's offset for a run resumed at update `step`: the loop starts the stream at micro-batch
    step * grad_accum + offset. The `saved_world` old ranks had each read `read` micro-batches; the same number
    of examples spread over `world` ranks is read * saved_world // world batches each: the same epoch and the
    same point in it. The position never depends on this run's grad_accum, only the offset does."""
    return read * saved_world // world - step * grad_accum


def elastic_seed(seed: int, rank: int, step: int) -> int:
    """The new per-rank seed after an elastic resume: from train.seed, the rank and the resumed step."""
    return ((seed * 1_000_003 + step) * 65_537 + rank) % 2**63


def pool_chains(banks: list[torch.Tensor], rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s share of the pooled chains: chain 0 of every old rank in rank order, then chain 1, ...;
    new rank r takes every world-th chain from position r, so every share draws on every old rank."""
    pool = torch.stack(banks, dim=1).reshape(-1, banks[0].shape[-1])  # (L_old * N, Z), interleaved
    return pool[rank::world]


def load_pooled_rank_state(state, store: CheckpointStore, name: str, saved_world: int, step: int) -> str:
    """This rank's chains from all `saved_world` rank files, then the RNGs reseeded; returns what was done."""
    acc, bank = state.acc, state.bank
    seed = elastic_seed(state.cfg.train.seed, acc.process_index, step)
    runtime.seed_everything(seed)
    if bank is None:
        return "no persistent chains"
    files = [store.read_torch(name, f"rank-{r:05d}.pt")["bank"] for r in range(saved_world)]
    banks = [f["z"] for f in files if f is not None]
    bank.generator.manual_seed(seed + 1)
    if not banks:
        return f"no chains saved, {len(bank)} per rank fresh from p0"
    if banks[0].shape[-1] != bank.z.shape[-1]:
        raise C.ConfigError(f"model.z_dim: the saved chains of {store.url_of(name)} have {banks[0].shape[-1]} "
                            f"dimensions, this run {bank.z.shape[-1]}; use the saved run's value or start without "
                            "resuming")
    share, size = pool_chains(banks, acc.process_index, acc.num_processes), len(bank)
    kept = share[:size].to(bank.device, bank.z.dtype)
    bank.z = torch.cat([kept, bank.sample_p0(size - len(kept))]) if len(kept) < size else kept.clone()
    pooled = sum(len(b) for b in banks)
    if len(share) >= size:
        extra = f" (the first {size} of each rank's share of {len(share)})" if len(share) > size else ""
        return f"pooled {pooled} chains -> {size} per rank{extra}"
    return f"pooled {pooled} chains -> {len(share)} per rank, filled to {size} from p0"


# ----------------------------------------------------------------------------- best-* checkpoints


def best_checkpoint(state, store: CheckpointStore) -> str | None:
    """best-<counters' best step>, if it is complete and this run's. The counters come from the live timeline
    (a resume brings back the checkpoint's), so this never picks a dead timeline's best-* or another run's,
    whatever their step numbers."""
    step = state.counters.get("best_step", -1)
    name = store.dir_name("best", step)
    if step < 0 or not store.exists(name, MARKER):
        return None
    return name if store.read_json(name, "meta.json").get("run_id") == state.counters.get("run_id") else None


def prune_best(store: CheckpointStore) -> None:
    """Keep the newest complete best-* and the one the newest complete step-* refers to (a resume from that
    step goes back to its best); remove older complete ones and older partial saves."""
    best = store.complete("best")
    if not best:
        return
    keep = {best[-1][1]}
    steps = store.complete("step")
    if steps:
        referred = store.read_json(steps[-1][1], "meta.json").get("best_step", -1)
        keep.add(store.dir_name("best", referred))
    doomed = [name for kind, n, name in store.entries() if kind == "best" and n < best[-1][0] and name not in keep]
    store.remove(doomed)
