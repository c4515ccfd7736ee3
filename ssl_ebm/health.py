"""Training health: metrics that show a latent EBM diverging, a watchdog that rolls it back, early stopping.

How to read the metrics: docs/HEALTH.md. Everything here is computed as device tensors; the host sees
them only at log steps (`Monitor.record`, one transfer) and through the loop's one per-step status
gather, which the watchdog's checks ride on (`Monitor.status`). The loop calls, per step (one update;
per micro-batch for the status when train.grad_accum > 1):

    monitor.status(terms, stop_requested)  -> [finite, stop, *CHECKS ok], gathered over ranks
    monitor.measure_grads(net)             after backward, on log steps only
    watchdog.recover(...)                  when a gathered check failed: roll back, or give up
    monitor.record(terms, z_neg)           on log steps: the health metrics as Python floats

The divergence this guards against (shared/NOTES.md, docs/HEALTH.md): the chains stop following the
prior, so the gap F(z+) - F(z-) climbs for a few hundred steps; then F(z-) falls to -1e4, the chains fly
off (|z-| ~ 10x the p0 radius) or F(z+) grows without bound, and every input gets the majority class.
"""

from __future__ import annotations

import math

import torch

from ssl_ebm.config import Config, HealthConfig

PARTS = ("encoder", "generator", "prior")
CHECKS = ("energy", "gap", "chains")  # the watchdog's bounds, in the order of Monitor.status after [finite, stop]


class TrainingError(RuntimeError):
    """The run cannot go on (a NaN loss, a divergence the watchdog could not undo); the message names
    the step and what to change. launch/train.py turns it into one `error:` line and exit status 2."""


def chain_norm_bound(cfg: Config) -> float:
    """health.max_chain_norm, or by default 5x the typical norm of a p0 draw, sigma0 * sqrt(z_dim)."""
    return cfg.health.max_chain_norm or 5.0 * cfg.model.sigma0 * math.sqrt(cfg.model.z_dim)


class Monitor:
    """Health metrics as device tensors, and the watchdog's per-step checks."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.max_energy, self.max_gap = cfg.health.max_abs_energy, cfg.health.max_energy_gap
        self.max_chain_norm = chain_norm_bound(cfg)
        self.sampler_stats: dict[str, torch.Tensor] = {}  # filled by langevin() on every step (stats=...)
        self.grads: dict[str, torch.Tensor] = {}
        self.gap: torch.Tensor | None = None  # |F(z+) - F(z-)| of the last step, for checkpoint_health

    def due(self, done: int) -> bool:
        """Whether step `done` is a log step (the same rule as the loop's logging)."""
        every = self.cfg.train.log_every
        return bool(every) and (done % every == 0 or done == self.cfg.train.steps)

    def status(self, terms: dict[str, torch.Tensor], stop_requested: bool) -> torch.Tensor:
        """(5,) bool on the loss's device: [loss finite, stop requested, *CHECKS in bounds].

        A NaN fails every comparison, so a NaN energy or chain norm counts as out of bounds. With the
        watchdog off the bounds are not checked (always True).
        """
        loss = terms["loss"].detach()
        self.gap = (terms["F_pos"] - terms["F_neg"]).abs()
        finite = torch.isfinite(loss)
        stop = torch.full((), bool(stop_requested), dtype=torch.bool, device=loss.device)  # a fill, not a copy
        if not self.cfg.health.watchdog:
            ok = torch.ones(len(CHECKS), dtype=torch.bool, device=loss.device)
            return torch.cat([torch.stack([finite, stop]), ok])
        F_pos, F_neg = terms["F_pos"], terms["F_neg"]
        energy_ok = (F_pos.abs() <= self.max_energy) & (F_neg.abs() <= self.max_energy)
        gap_ok = ((F_pos - F_neg).abs() <= self.max_gap) | (self.max_gap == 0)
        chains_ok = terms["z_neg_norm"] <= self.max_chain_norm
        return torch.stack([finite, stop, energy_ok, gap_ok, chains_ok])

    def checkpoint_health(self) -> dict[str, float]:
        """For a checkpoint's meta: the energy gap of the last step (one host sync, at checkpoint steps
        only). The watchdog prefers restore points that were well inside the gap bound."""
        return {} if self.gap is None else {"energy_gap": float(self.gap)}

    def measure_grads(self, net) -> None:
        """Gradient norm of each part (encoder, generator, prior), before clipping. Under DeepSpeed the
        gradients live in the engine (p.grad is None) and these metrics are absent."""
        for part in PARTS:
            grads = [p.grad for p in getattr(net, part).parameters() if p.grad is not None]
            if grads:
                self.grads[f"grad_norm_{part}"] = torch.nn.utils.get_total_norm(grads)

    def record(self, terms: dict[str, torch.Tensor], z_neg: torch.Tensor | None) -> dict[str, float]:
        """The health metrics beyond the loss terms, as floats (one device-to-host transfer)."""
        values = {}
        if z_neg is not None:
            norm_N = z_neg.detach().float().norm(dim=1)
            values.update(energy_gap=terms["F_pos"] - terms["F_neg"], z_neg_norm_max=norm_N.max(),
                          z_neg_norm_std=norm_N.std() if norm_N.numel() > 1 else norm_N.new_zeros(()))
            values.update(self.sampler_stats)
        values.update(self.grads)
        self.grads = {}
        if not values:
            return {}
        flat = torch.stack([v.detach().float().reshape(()) for v in values.values()]).tolist()
        return dict(zip(values, flat))


def val_record(val: dict) -> dict[str, float]:
    """Validation metrics for the log; balanced accuracy (mean per-class recall) is 1/K for a model that
    predicts one class for everything, whatever the class balance."""
    per_class = val.get("per_class_accuracy") or [float("nan")]
    return {"val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"],
            "val_balanced_accuracy": sum(per_class) / len(per_class),
            **({"val_prior_accuracy": val["prior_accuracy"]} if "prior_accuracy" in val else {})}


def early_stop(cfg: HealthConfig, meta: dict, improved: bool) -> bool:
    """Count validation passes without a new best; True when health.patience of them have passed."""
    meta["evals_since_best"] = 0 if improved else meta.get("evals_since_best", 0) + 1
    return cfg.patience > 0 and meta["evals_since_best"] >= cfg.patience


def restore_point(complete: list[tuple[int, str]], step: int, last: int | None) -> tuple[int, str] | None:
    """The (step, name) to go back to after the check at step index `step` failed, from the complete step
    checkpoints `complete` (oldest first): the newest before `step`; but if none newer than the last
    restore point `last` exists, the run failed again from there, so the newest before `last` (if any)."""
    good = [(s, name) for s, name in complete if s < step]
    if last is not None and good and good[-1][0] <= last and any(s < last for s, _ in good):
        good = [(s, name) for s, name in good if s < last]
    return good[-1] if good else None


class Watchdog:
    """Rolls a diverging run back to its last good checkpoint, resets the chains and applies the remedy
    (the prior's learning rate times health.lr_prior_factor); gives up after health.max_recoveries.

    "Good": the checkpoint named step-d holds the weights and chains the loop checks at step index d, so
    every checkpoint older than the failed check passed its check; the one at the failed step did not.
    Among those, ones written with the energy gap above half its bound are passed over when a calmer
    one exists (the gap climbs for hundreds of steps before it crosses the bound).
    Checkpoints newer than the restore point are deleted (they belong to the timeline that failed), so
    neither the watchdog nor train.resume=auto ever goes back to them. A run that fails again before a
    newer checkpoint has passed goes one checkpoint further back (keep train.keep_last >= 2 for that).
    """

    def __init__(self, cfg: Config, acc, store, jsonl=None):
        self.cfg, self.acc, self.store, self.jsonl = cfg, acc, store, jsonl
        if cfg.health.watchdog and not cfg.train.checkpoint_every and cfg.train.steps > 2000:
            acc.print("note: health.watchdog is on but train.checkpoint_every is 0, so a recovery goes back to "
                      "step 0; set train.checkpoint_every to give it closer restore points")

    def _calm(self, name: str) -> bool:
        """Whether a checkpoint was written well inside the gap bound (at most half of it), or did not record
        its gap. One written as the gap climbed towards the bound tends to fail again within steps."""
        gap = self.store.read_json(name, "meta.json").get("energy_gap")
        return gap is None or not self.cfg.health.max_energy_gap or gap <= self.cfg.health.max_energy_gap / 2

    def describe(self, status_RC: torch.Tensor, terms: dict[str, torch.Tensor]) -> str:
        """What the checks saw, with the values of this process (and which ranks failed, if several)."""
        h = self.cfg.health
        failed = {name: [r for r in range(status_RC.shape[0]) if not status_RC[r, col]]
                  for name, col in (("finite", 0), *((c, 2 + i) for i, c in enumerate(CHECKS)))}
        seen = []
        if failed["finite"]:
            seen.append(f"non-finite loss ({float(terms['loss'].detach()):.4g})")
        if failed["energy"]:
            seen.append(f"F(z+) = {float(terms['F_pos']):.4g}, F(z-) = {float(terms['F_neg']):.4g}: |F| above "
                        f"{h.max_abs_energy:g} (health.max_abs_energy)")
        if failed["gap"]:
            gap = float(terms["F_pos"]) - float(terms["F_neg"])
            seen.append(f"F(z+) - F(z-) = {gap:.4g}: the chains no longer follow the prior, gap above "
                        f"{h.max_energy_gap:g} (health.max_energy_gap)")
        if failed["chains"]:
            seen.append(f"mean |z-| = {float(terms['z_neg_norm']):.4g} above {chain_norm_bound(self.cfg):.4g} "
                        "(health.max_chain_norm)")
        ranks = sorted({r for rs in failed.values() for r in rs})
        where = f" on rank(s) {', '.join(map(str, ranks))}" if status_RC.shape[0] > 1 else ""
        return "; ".join(seen) + where

    def recover(self, done: int, status_RC: torch.Tensor, terms: dict, state) -> None:
        """Called on every rank at the step whose checks failed (before any update from it); `state` is the
        run's TrainingState, its counters are updated here."""
        h, step = self.cfg.health, done - 1  # the failed check was of the weights and chains at step index `step`
        saw, counters = self.describe(status_RC, terms), state.counters
        counters["recoveries"] = counters.get("recoveries", 0) + 1
        if counters["recoveries"] > h.max_recoveries:
            raise TrainingError(
                f"step {done}: {saw}; the watchdog gave up after {h.max_recoveries} recoveries "
                f"(health.max_recoveries). Start with a lower optim.lr_prior (the remedy that worked in "
                "docs/HEALTH.md), or raise health.max_recoveries; the best checkpoint on validation so far is kept")
        complete = self.store.complete("step")
        calm = [(s, n) for s, n in complete if self._calm(n)]
        point = restore_point(calm, step, counters.get("restored_from")) or \
            restore_point(complete, step, counters.get("restored_from"))
        if point is None:
            raise TrainingError(f"step {done}: {saw}; the watchdog found no checkpoint before step {step} in "
                                f"{self.store.url} to go back to")
        # Checkpoints after the restore point belong to the timeline that failed (the one at `step` holds the
        # very weights that failed): dropped, so that neither a later recovery nor resume=auto goes there.
        dropped = [n for s, n in complete if s > point[0]]
        counters["restored_from"], name = point
        saved = state.roll_back(self.store, name, dropped)
        # The remedy compounds: the checkpoint's prior lr times the factor once per recovery since it was saved.
        lr_before = state.prior_lr()
        state.scale_prior_lr(h.lr_prior_factor ** (counters["recoveries"] - saved.get("recoveries", 0)))
        state.set_schedule_position(done)  # the skipped and rolled-back steps still count
        chains = f"reset {len(state.bank)} chains to p0, " if state.bank is not None else ""
        drop = f" (dropped {', '.join(dropped)})" if dropped else ""
        line = (f"watchdog: step {done}: {saw}; restored {name}{drop}, {chains}prior lr "
                f"{lr_before:.3g} -> {state.prior_lr():.3g} (recovery {counters['recoveries']} of "
                f"{h.max_recoveries})")
        self.acc.print(line, flush=True)
        self.acc.log({"health/recoveries": counters["recoveries"]}, step=done)
        if self.jsonl is not None:
            self.jsonl.write({"step": done, "watchdog": line, "recoveries": counters["recoveries"]})
            self.jsonl.flush()
