"""launch/train.py that writes down its DeepSpeed state whole, right after saving a step checkpoint and right
after resuming, for the test of resuming ZeRO on another process count (tests/test_deepspeed.py):

    accelerate launch --config_file configs/accelerate/zero2.yaml ... tests/scripts/zero_state.py DIR --config ...

After each step checkpoint `step-S` (S > 0) it writes DIR/saved-S.pt, after a resume from `step-S` DIR/resumed-S.pt:
every parameter's weights (the module's and the optimizer's fp32 copy), its Adam moments and step, and each
group's learning rate, assembled whole from the ranks' shards (DeepSpeed's safe_get_full_* calls, collectives),
and every rank's chains (DIR/<event>-S-chains-<rank>.pt).
"""

import sys
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))

import train  # noqa: E402  (launch/train.py)
from ssl_ebm.state import TrainingState  # noqa: E402

out = Path(sys.argv[1])


def write_down(state: TrainingState, event: str, step: int) -> None:
    zero = state.model.optimizer
    # DeepSpeed links each parameter to its Adam moments once, after the first group's first step, when the
    # other groups have no moments yet; link again so that safe_get_full_optimizer_state finds every group's.
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # (ZeRO-1 and 2; ZeRO-3 finds them itself)
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    named = list(state.net.named_parameters())
    with train.runtime.full_params(state.acc, state.net):  # (ZeRO-3: gathered)
        weights = {n: p.detach().cpu().clone() for n, p in named}
    whole = {
        "weights": weights,
        "fp32": {n: safe_get_full_fp32_param(p).cpu() for n, p in named},
        "exp_avg": {n: safe_get_full_optimizer_state(p, "exp_avg").cpu() for n, p in named},
        "exp_avg_sq": {n: safe_get_full_optimizer_state(p, "exp_avg_sq").cpu() for n, p in named},
        "adam_step": [float(zero.optimizer.state[g["params"][0]]["step"]) for g in zero.optimizer.param_groups
                      if g["params"]],  # (ZeRO-3 keeps groups without parameters on a rank)
        "lr": [g["lr"] for g in state.optimizer.param_groups],
    }
    torch.save(state.bank.z.cpu(), out / f"{event}-{step}-chains-{state.acc.process_index}.pt")
    if state.acc.is_main_process:
        torch.save(whole, out / f"{event}-{step}.pt")


save, resume = TrainingState.save, TrainingState.resume


def save_then_write(self, store, kind, step, **extra):
    name = save(self, store, kind, step, **extra)
    if kind == "step" and step > 0:  # (step-000000, written before the first update, has no Adam state yet)
        write_down(self, "saved", step)
    return name


def resume_then_write(self, store, name):
    step = resume(self, store, name)
    write_down(self, "resumed", step)
    return step


TrainingState.save, TrainingState.resume = save_then_write, resume_then_write
train.runtime.exit_process(train.main(sys.argv[2:]))
