"""How a results row is measured: what data may choose each method's settings and weights, and its budget.

Two protocols (launch/reproduce.py --protocol):

    realistic   every method sees only the N labelled examples (and the unlabelled pool). Network methods
                (ours, supervised-only, VAT, Pi-model) run fixed settings for the same number of updates,
                once, and are tested with the weights at the end of training (their moving average where the
                config keeps one): train.select=final, so the validation split is never opened. The
                scikit-learn methods choose their settings by stratified k-fold cross-validation on the N
                labels and are refitted on all N.
    oracle-val  the protocol of most papers: a validation split, usually many times larger than N, chooses
                every setting, each network's checkpoint and the baselines' grids. Kept for comparison with
                published numbers; its rows say so.

A Budget is what each method was given, recorded in the row: updates, restarts, settings tried, and the
data that chose among them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

PROTOCOLS = ("realistic", "oracle-val")
NETWORK_METHODS = ("ours", "supervised", "vat", "pi")
CV_FOLDS = 5  # stratified folds of the labelled set (fewer when N is smaller)


def check(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    return protocol


def train_overrides(protocol: str, updates: int) -> list[str]:
    """launch/train.py overrides that put a run of ours or supervised-only under `protocol`."""
    if check(protocol) == "realistic":
        return [f"train.steps={updates}", "train.select=final", "health.patience=0"]
    return [f"train.steps={updates}", "train.select=val"]


def reads_validation(protocol: str) -> bool:
    return check(protocol) == "oracle-val"


def chooser(protocol: str, settings_tried: int, network: bool) -> str:
    """In words, what chose a method's setting (and, for networks, its weights) under `protocol`."""
    if check(protocol) == "oracle-val":
        what = "setting and checkpoint" if network else "setting"
        return f"the validation split ({what})" if settings_tried > 1 or network else "fixed"
    if network:
        return "fixed settings; the weights at the end of training"
    return f"stratified {CV_FOLDS}-fold cross-validation on the labelled set" if settings_tried > 1 else "fixed"


@dataclass(frozen=True)
class Budget:
    """What one method was given on one row: the same for every network method under the realistic protocol."""

    updates: int  # optimizer updates per run (0 for the scikit-learn methods)
    restarts: int  # initialisations per seed
    settings_tried: int  # points of its grid (1 = fixed settings)
    chosen_by: str  # what chose among them

    def record(self) -> dict:
        return asdict(self)


def network_budget(protocol: str, updates: int, settings_tried: int = 1, restarts: int = 1) -> Budget:
    return Budget(updates, restarts, settings_tried, chooser(protocol, settings_tried, network=True))


def sklearn_budget(protocol: str, settings_tried: int) -> Budget:
    return Budget(0, 1, settings_tried, chooser(protocol, settings_tried, network=False))


def cv_folds(labels) -> int:
    """Folds for stratified cross-validation on a labelled set: CV_FOLDS, or the size of the largest class
    when that is smaller (at least 2). A class with fewer labels than folds sits out of some folds' training
    parts, as it would in any resampling of so few labels."""
    import numpy as np

    counts = np.bincount(np.asarray(labels))
    return int(max(2, min(CV_FOLDS, counts.max())))
