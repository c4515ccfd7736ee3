"""Evaluation with torchmetrics: accuracy, per-class accuracy and macro F1, exact across processes.

The evaluation loader hands each process a disjoint part of the split with no padding, so the
metrics' summed states (synchronised by torchmetrics over torch.distributed) count every example
exactly once.

torchmetrics is imported at the first evaluation, not with this module: importing it loads its text and audio
metrics too (transformers and scipy.signal, about 3 s of a 6.5 s start-up on a CPU core), which a run that stops
on bad input, or is stopped before it evaluates, has no use for.
"""

from __future__ import annotations

import torch

from ssl_ebm import runtime


@torch.no_grad()
def evaluate(predict_logits, batches, num_classes: int, device) -> dict:
    """Run `predict_logits(x) -> logits_BK` over `batches` ({"x", "y"} dicts); return the metrics."""
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

    acc = MulticlassAccuracy(num_classes=num_classes, average="micro").to(device)
    per_class = MulticlassAccuracy(num_classes=num_classes, average="none").to(device)
    f1 = MulticlassF1Score(num_classes=num_classes, average="macro").to(device)
    count = torch.zeros((), dtype=torch.long, device=device)
    for batch in batches:
        x = batch["x"].to(device, non_blocking=True)
        y = batch["y"].to(device, non_blocking=True)
        if len(y) == 0:
            continue
        pred = predict_logits(x).float().argmax(dim=-1)
        for m in (acc, per_class, f1):
            m.update(pred, y)
        count += len(y)
    runtime.sum_over_processes(count)
    if int(count) == 0:
        return {"count": 0}
    return {
        "count": int(count),
        "accuracy": float(acc.compute()),
        "per_class_accuracy": [float(v) for v in per_class.compute()],
        "macro_f1": float(f1.compute()),
    }
