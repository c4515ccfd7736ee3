"""ssl_ebm/health.py and the stabilisers: each option's effect, the watchdog end to end, early stopping."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from conftest import REPO, TINY, run_train
from ssl_ebm import config as C
from ssl_ebm import health
from ssl_ebm.langevin import ChainBank, langevin, sample_negatives
from ssl_ebm.model import LatentEBM
from ssl_ebm.nets import Prior
from ssl_ebm.state import lr_factor

FAULT = REPO / "tests" / "scripts" / "train_with_fault.py"  # launch/train.py with a fault injected

DIGITS = str(REPO / "configs" / "digits.yaml")
SMALL = dict(x_shape=(6,), num_classes=3, z_dim=4, hidden=16, prior_hidden=16)


def tiny(shards: str, out, *extra: str) -> list[str]:
    return ["--config", DIGITS, *TINY, f"data.shards={shards}", f"train.out_dir={out}", *extra]


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def scaled_prior(spectral_norm: bool, scale: float) -> Prior:
    """A prior whose weights are `scale` times their initial values: a prior that has run away."""
    torch.manual_seed(0)
    prior = Prior(C.ModelConfig(**SMALL, prior_spectral_norm=spectral_norm))
    with torch.no_grad():
        for name, p in prior.named_parameters():
            if "weight" in name:
                p.mul_(scale)
        for _ in range(50):  # let spectral norm's power iteration converge on the new weights
            prior(torch.randn(8, SMALL["z_dim"]))
    return prior


# ----------------------------------------------------------------------------- stabilisers, one effect each


def test_drift_clip_bounds_every_langevin_step():
    prior, s, clip = scaled_prior(False, 30.0), 0.6, 2.0
    z0 = 3 * torch.randn(256, SMALL["z_dim"])
    still = torch.zeros(1, *z0.shape)  # no noise: the move is the drift alone
    free = langevin(prior, z0, steps=1, step_size=s, sigma0=1.0, noise=still)
    stats = {}
    clipped = langevin(prior, z0, steps=1, step_size=s, sigma0=1.0, noise=still, drift_clip=clip, stats=stats)
    move_free, move_clipped = (free - z0).norm(dim=1), (clipped - z0).norm(dim=1)
    assert move_clipped.max() <= 0.5 * s * s * clip * (1 + 1e-5)  # |z' - z| <= s^2 / 2 * drift_clip
    assert move_free.max() > 10 * 0.5 * s * s * clip, "the runaway prior should move chains far without the clip"
    assert float(stats["drift_norm"]) > clip and float(stats["drift_clipped_frac"]) > 0.9


def test_energy_penalty_bounds_the_energies():
    """Only the prior learns, on fixed data and fixed negatives far from the posteriors: without the penalty
    F(z+) - F(z-) grows without bound; with weight w, (F(z+) - 1/2w)^2 + (F(z-) + 1/2w)^2 pins |F| near 1/2w."""

    def train_prior(penalty: float) -> float:
        torch.manual_seed(0)
        model = LatentEBM(C.ModelConfig(**SMALL, energy_penalty=penalty))
        x_u, z_neg = torch.randn(32, 6), 4 + torch.randn(64, SMALL["z_dim"])
        opt = torch.optim.Adam(model.prior.parameters(), lr=1e-2)
        for _ in range(300):
            terms = model(x_u, None, None, z_neg)
            opt.zero_grad()
            terms["loss"].backward()
            opt.step()
        return max(abs(float(terms["F_pos"])), abs(float(terms["F_neg"])))

    penalty = 0.1
    bounded, free = train_prior(penalty), train_prior(0.0)
    assert bounded < 1.5 * 1 / (2 * penalty)
    assert free > 10 * bounded


def test_spectral_norm_bounds_the_prior_gradient():
    """With spectral normalisation every linear layer has norm 1, so |grad_z F| is at most the activation's
    Lipschitz constant squared (GELU: ~1.13), however large the raw weights grow."""

    def max_grad(prior: Prior) -> float:
        z = (3 * torch.randn(512, SMALL["z_dim"])).requires_grad_(True)
        (g,) = torch.autograd.grad(prior.free_energy(z).sum(), z)
        return float(g.norm(dim=1).max())

    assert max_grad(scaled_prior(True, 50.0)) <= 1.13**2 * 1.05
    assert max_grad(scaled_prior(False, 50.0)) > 100


def test_reinit_frac_brings_runaway_chains_back_to_p0():
    prior = Prior(C.ModelConfig(**SMALL))
    for frac in (0.0, 0.5):
        bank = ChainBank(2000, SMALL["z_dim"], sigma0=1.0, seed=0)
        bank.z.mul_(100.0)  # every chain has flown off
        cfg = C.SamplerConfig(steps=0, bank_size=2000, reinit_frac=frac)
        z = sample_negatives(prior, bank, 2000, cfg, sigma0=1.0)
        back = float((z.norm(dim=1) < 10).float().mean())
        assert abs(back - frac) < 0.05, (frac, back)
        assert float((bank.z.norm(dim=1) < 10).float().mean()) == back  # written back to the bank


def test_per_part_learning_rates_and_warmup():
    torch.manual_seed(0)
    model = LatentEBM(C.ModelConfig(**SMALL))
    optim = C.OptimConfig(lr_prior=0.0, lr_generator=1e-3, lr_encoder=1e-3, warmup_steps=4)
    opt = torch.optim.Adam(model.param_groups(optim))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    terms = model(torch.randn(8, 6), torch.randn(4, 6), torch.tensor([0, 1, 2, 0]), torch.randn(8, SMALL["z_dim"]))
    terms["loss"].backward()
    opt.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == name.startswith("prior."), name  # lr_prior=0 freezes the prior only
    factor = lr_factor(optim, steps=100)
    assert [factor(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


# ----------------------------------------------------------------------------- monitor, early stopping, config


def test_monitor_checks_every_bound_and_records_floats():
    cfg = C.Config(model=C.ModelConfig(**SMALL))
    monitor = health.Monitor(cfg)
    assert monitor.max_chain_norm == pytest.approx(5 * 1.0 * math.sqrt(SMALL["z_dim"]))
    one = torch.tensor(1.0)

    def status(**kw) -> list[bool]:
        terms = {"loss": one, "F_pos": one, "F_neg": one, "z_neg_norm": one, **kw}
        return monitor.status(terms, stop_requested=False).tolist()

    assert status() == [True, False, True, True, True]
    assert status(F_neg=torch.tensor(-2e4)) == [True, False, False, False, True]
    assert status(F_pos=torch.tensor(12.0)) == [True, False, True, False, True]  # gap 11 > 10
    assert status(z_neg_norm=torch.tensor(47.0)) == [True, False, True, True, False]
    nan = torch.tensor(float("nan"))
    assert status(loss=nan, F_pos=nan) == [False, False, False, False, True]
    no_gap = health.Monitor(replace(cfg, health=C.HealthConfig(max_energy_gap=0)))
    assert no_gap.status({"loss": one, "F_pos": torch.tensor(500.0), "F_neg": one, "z_neg_norm": one},
                         stop_requested=False).tolist() == [True, False, True, True, True]
    off = health.Monitor(replace(cfg, health=C.HealthConfig(watchdog=False)))
    assert off.status({"loss": one, "F_pos": one, "F_neg": torch.tensor(-2e4), "z_neg_norm": one},
                      stop_requested=True).tolist() == [True, True, True, True, True]

    model = LatentEBM(cfg.model)
    prior_stats = {}
    z_neg = langevin(model.prior, torch.randn(16, SMALL["z_dim"]), steps=2, step_size=0.6, sigma0=1.0,
                     stats=prior_stats)
    monitor.sampler_stats = prior_stats
    terms = model(torch.randn(8, 6), torch.randn(3, 6), torch.tensor([0, 1, 2]), z_neg)
    terms["loss"].backward()
    monitor.measure_grads(model)
    rec = monitor.record(terms, z_neg)
    assert set(rec) == {"energy_gap", "z_neg_norm_max", "z_neg_norm_std", "drift_norm", "drift_norm_max",
                        "drift_clipped_frac", "grad_norm_encoder", "grad_norm_generator", "grad_norm_prior"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in rec.values())
    assert rec["z_neg_norm_max"] == pytest.approx(float(z_neg.norm(dim=1).max()))


def test_restore_point_goes_further_back_when_a_restore_fails_again():
    ckpts = [(0, "step-000000"), (1500, "step-001500"), (1750, "step-001750")]
    assert health.restore_point(ckpts, 1791, None) == (1750, "step-001750")  # the newest that passed its check
    assert health.restore_point(ckpts, 1750, None) == (1500, "step-001500")  # step-001750 is the one that failed
    assert health.restore_point(ckpts, 1858, 1750) == (1500, "step-001500")  # failed again from 1750
    assert health.restore_point(ckpts[:2], 1900, 1500) == (0, "step-000000")  # (step-001750 was dropped)
    assert health.restore_point([*ckpts, (2000, "step-002000")], 2100, 1750) == (2000, "step-002000")
    assert health.restore_point(ckpts[:1], 50, 0) == (0, "step-000000")  # nothing older: the same again
    assert health.restore_point([], 50, None) is None


def test_early_stop_counts_passes_without_improvement():
    cfg, meta = C.HealthConfig(patience=2), {}
    assert [health.early_stop(cfg, meta, up) for up in (True, False, True, False, False)] == \
        [False, False, False, False, True]
    assert not any(health.early_stop(C.HealthConfig(), {}, False) for _ in range(5))  # patience 0: never


@pytest.mark.parametrize("overrides, fragment", [
    ({"health": {"lr_prior_factor": 0}}, "health.lr_prior_factor"),
    ({"health": {"max_abs_energy": -1}}, "health.max_abs_energy"),
    ({"health": {"max_recoveries": -1}}, "health.max_recoveries"),
    ({"health": {"fault_at_step": 5}}, "health.fault_at_step: unknown config key"),  # faults are a test hook only
    ({"health": {"patience": 3}}, "train.eval_every is 0"),
    ({"health": {"max_recoverys": 3}}, "did you mean 'health.max_recoveries'"),
])
def test_bad_health_config_says_what_to_change(overrides, fragment):
    with pytest.raises(C.ConfigError, match=fragment.replace(".", r"\.")):
        C.from_dict(C.Config, overrides)


def test_roll_back_clears_gradients_accumulated_off_the_sync_step(tmp_path):
    """With train.grad_accum=2 the first micro-batch's backward leaves gradients that Accelerate's zero_grad
    does not touch (not a sync step); a roll-back must drop them, or they would leak into the next update."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from ssl_ebm import runtime
    from ssl_ebm.checkpoint import CheckpointStore
    from ssl_ebm.state import TrainingState

    for reset in (AcceleratorState, GradientState, PartialState):
        reset._reset_state()
    cfg = C.Config(model=C.ModelConfig(**SMALL), sampler=C.SamplerConfig(bank_size=64),
                   train=C.TrainConfig(grad_accum=2, log_with="none"))
    acc = runtime.make_accelerator(cfg)
    state, store = TrainingState.create(cfg, acc), CheckpointStore(str(tmp_path / "ckpt"))
    state.save(store, "step", 0)
    with acc.accumulate(state.model):
        assert not acc.sync_gradients, "the first micro-batch of a window of 2"
        terms = state.model(torch.randn(8, 6), torch.randn(4, 6), torch.tensor([0, 1, 2, 0]), torch.randn(8, 4))
        acc.backward(terms["loss"])
    assert all(p.grad is not None for p in state.net.parameters())
    state.roll_back(store, "step-000000", [])
    stale = [name for name, p in state.net.named_parameters() if p.grad is not None]
    assert not stale, f"gradients of the failed timeline survive the roll-back: {stale}"
    for reset in (AcceleratorState, GradientState, PartialState):
        reset._reset_state()


# ----------------------------------------------------------------------------- end to end


def test_watchdog_recovers_from_a_forced_divergence(digits_shards, tmp_path):
    """A huge prior lr from update 15 on blows F up; the check at step 16 sees it, the run goes back to
    step-000010 (step-000015 already holds the blown-up weights and is dropped), with half the prior lr,
    and finishes."""
    out = tmp_path / "fault"
    proc = run_train(["15", "1e4", *tiny(digits_shards, out, "train.steps=40", "train.checkpoint_every=5",
                                         "optim.lr_prior=1e-5")], script=FAULT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("watchdog:")]
    assert len(lines) == 1, proc.stdout
    assert lines[0].startswith("watchdog: step 16: ") and "|F| above 1000 (health.max_abs_energy)" in lines[0]
    assert ("restored step-000010 (dropped step-000015), reset 500 chains to p0, prior lr 1e-05 -> 5e-06 "
            "(recovery 1 of 3)") in lines[0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recoveries"] == 1 and metrics["test"]["count"] > 0
    assert 0 <= json.loads((out / "checkpoints" / "step-000040" / "meta.json").read_text())["energy_gap"] < 5
    final = torch.load(out / "checkpoints" / "step-000040" / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in final.values())
    log = records(out)
    assert [r["step"] for r in log if "watchdog" in r] == [16]
    train_log = [r for r in log if "loss" in r]
    assert [r["lr_prior"] for r in train_log if r["step"] >= 20] == [5e-6] * 5
    for r in train_log:
        if r["step"] != 15:  # step 15 logged the blown-up update's outcome only through lr_prior
            assert abs(r["F_pos"]) < 1000 and abs(r["F_neg"]) < 1000, r
        for key in ("energy_gap", "z_neg_norm_std", "drift_norm", "grad_norm_prior", "logvar_min", "ce"):
            assert key in r, (key, r)
    assert any("val_balanced_accuracy" in r for r in log)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {tag for events in (out / "tensorboard").rglob("events.out.tfevents.*")
            for tag in EventAccumulator(str(events)).Reload().Tags()["scalars"]}
    assert {"health/drift_norm", "health/grad_norm_prior", "health/recoveries", "train/F_neg",
            "val/balanced_accuracy"} <= set(tags)


@pytest.mark.slow
def test_watchdog_recovers_identically_on_two_processes(digits_shards, tmp_path):
    out = tmp_path / "fault2"
    proc = run_train(["15", "1e4", *tiny(digits_shards, out, "train.steps=30", "train.checkpoint_every=5",
                                         "optim.lr_prior=1e-5")], nproc=2, script=FAULT)
    assert len([line for line in proc.stdout.splitlines() if line.startswith("watchdog: step 16: ")]) == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["recoveries"] == 1
    a, b = metrics["rank_param_checksums"]
    assert a == b and math.isfinite(a), "ranks must restore the same checkpoint and end with the same weights"


def test_watchdog_gives_up_cleanly_when_recovery_is_impossible(digits_shards, tmp_path):
    # lr 1e30 diverges from the first update; halving it twice changes nothing.
    proc = run_train(tiny(digits_shards, tmp_path / "hopeless", "optim.lr_prior=1e30", "train.steps=20",
                          "health.max_recoveries=2"), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert len([line for line in proc.stdout.splitlines() if line.startswith("watchdog:")]) == 2
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith("error: step 6: non-finite loss") and "gave up after 2 recoveries" in error


def test_early_stopping_selects_on_validation_and_stays_stopped(digits_shards, tmp_path):
    out = tmp_path / "patience"
    frozen = ["optim.lr_prior=0", "optim.lr_encoder=0", "optim.lr_generator=0"]  # validation cannot improve
    args = tiny(digits_shards, out, "train.steps=100", "train.eval_every=5", "health.patience=2", *frozen)
    proc = run_train(args)
    assert "early stop at step 15" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped_at"] == 15 and metrics["best_step"] == 5
    assert max(r["step"] for r in records(out)) == 15
    again = run_train(args)  # resume=auto: the stopped run is not trained further
    assert "early stop" not in again.stdout
    assert json.loads((out / "metrics.json").read_text())["stopped_at"] == 15
