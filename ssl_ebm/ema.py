"""Weight averaging for evaluation: an exponential moving average of the weights (Polyak averaging).

    avg = WeightAverage(net, decay=0.999)   a copy of every weight and buffer
    avg.update(net)                          after each optimizer update
    with avg.applied(net): evaluate(net)     the averaged weights in place, the trained ones back after

Training never sees the average; validation, the best-* checkpoints and the test split do (`train.ema_decay`).
The decay ramps up as min(decay, (1 + n) / (10 + n)) after n updates, so the first hundred updates do not
carry the random initialisation into the average for thousands more. Integer buffers (BatchNorm's counts)
are copied, not averaged; the average is kept in fp32 whatever the weights' dtype (an update of 1e-3 of a
bf16 weight would round away). Every rank applies the same updates to the same weights, so the averages agree.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class WeightAverage:
    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.reset(module)

    def rate(self) -> float:
        """The decay of the next update."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        d = self.rate()
        self.updates += 1
        for k, v in module.state_dict().items():
            s = self.shadow[k]
            if s.is_floating_point():
                s.lerp_(v.detach().to(s.dtype), 1.0 - d)
            else:
                s.copy_(v)

    @contextmanager
    def applied(self, module: torch.nn.Module):
        """The averaged weights in `module` for the block (copied in place: memory formats and devices stay)."""
        trained = {k: v.detach().clone() for k, v in module.state_dict().items()}
        module.load_state_dict(self.shadow)
        try:
            yield module
        finally:
            module.load_state_dict(trained)

    def reset(self, module: torch.nn.Module) -> None:
        """Start again from `module`'s weights (a checkpoint saved without an average)."""
        self.updates = 0
        self.shadow = {k: _copy(v) for k, v in module.state_dict().items()}

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates,
                "shadow": {k: v.detach().to("cpu", copy=True) for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise KeyError(f"weight average does not match the model: {sorted(missing)[:5]}")
        self.updates = int(state["updates"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


def _copy(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.float().clone() if t.is_floating_point() else t.clone()
