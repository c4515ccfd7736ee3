"""Screen a change of the shared defaults on the development tables' validation splits (never on test).

    python launch/screen.py --tables magic_gamma,letter,satimage,shuttle,spambase --seeds 3 --updates 2000 \
        --name vat1 model.vat_weight=1

How defaults are chosen without test figures in view: each candidate (a set of overrides of the shared
tabular defaults) trains on the given tables' seeds exactly as the realistic protocol would (fixed settings,
`--updates` updates, the weights at the end), and is scored by the validation accuracy of those final
weights: the one validation pass is at the last update (train.eval_every = train.steps), so no checkpoint is
chosen on it. The test split is evaluated by train.py as always but never printed or kept here. Each
candidate's per-table and mean validation accuracy are appended to <work>/screen.jsonl; runs go to
<work>/<table>/seed<s>/<name>, logged in <work>/<table>/<name>.jsonl (an unchanged candidate is not trained
again). Shards are those of
launch/reproduce.py (runs/reproduce/<table>/seed<s>/shards), built if missing.

The network baselines are screened the same way (`--method vat` or `--method pi`): launch/baselines.py's run
at the realistic protocol's fixed settings, `--settings` merged over them, scored by the validation accuracy of
its final weights. A change to ours that a baseline shares (the VAT radius, say) is offered to the baseline too:

    python launch/screen.py --method vat --name vat_eps005 --settings '{"eps": 0.05}'

Several initialisations inside the same budget (`--members N`, ours only): each labelled set trains N members,
member m from initialisation seed + 1000 m (member 0 is the plain run's), each for `--updates` updates, so that
N x updates is the budget a single run would have had; the candidate is scored by the validation accuracy of the
members' averaged p(y|x) (each loaded from its final checkpoint as ssl_ebm.api loads a model, graph smoothing
included), and each member's own accuracy is kept beside it:

    python launch/screen.py --name ens2 --members 2 --updates 1000 model.vat_eps=0.05

A run that fails (the watchdog giving up on a diverging prior, say) is a failure of the candidate, not of the
screen: it is recorded under "failed" (table, seed, the error's last line), the other runs go on, and the
candidate's means cover the runs that finished; a candidate with a failed run is not one to adopt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "launch"))

import baselines as BL  # launch/baselines.py
import reproduce as R  # launch/reproduce.py
from shards import make
from ssl_ebm import config as C


def baseline_settings(method: str, text: str) -> dict | None:
    """A network baseline's settings for the screen: its realistic FIXED ones with `text` (JSON) merged over
    them; None for ours and the supervised-only twin."""
    if method not in BL.NEURAL:
        if text:
            raise ValueError(f"--settings is for --method {' or '.join(BL.NEURAL)}, not {method}")
        return None
    return BL.parse_settings(text or "{}", method, base=BL.FIXED[method])


def member_name(name: str, m: int) -> str:
    """The run folder and log of member m of a candidate: member 0 is the plain run's, so that a one-member
    screen and member 0 of an ensemble are the same run, trained once."""
    return name if m == 0 else f"{name}-m{m}"


def ensemble_accuracy(runs: list[tuple[Path, str, dict]], updates: int) -> float:
    """Validation accuracy (%) of the members' averaged p(y|x), each member loaded from its final checkpoint
    (`best-<updates>`: the one validation pass, at the last update) as ssl_ebm.api loads a trained model."""
    from ssl_ebm import api

    x, y = api.read_examples(runs[0][1], "val")
    proba = sum(api.load(str(out / "checkpoints" / f"best-{updates:06d}"), allow_pickle=True, shards=url)
                .predict_proba(x) for out, url, _ in runs) / len(runs)
    return 100 * float((proba.argmax(dim=-1) == y).float().mean())


def score(jobs: list, done: list[dict], n_members: int, updates: int) -> tuple[dict, dict, list]:
    """Per table, the validation accuracy (%) of each labelled set whose runs all finished (one run's, or its
    members' averaged prediction), each member's own accuracy, and the failed runs."""
    per_table: dict[str, list[float]] = {}
    members: dict[str, list[list[float]]] = {}
    failed = []
    finished: dict[tuple[str, int], list[tuple[Path, str, dict]]] = {}
    for (table, s, m, *_, out, url), res in zip(jobs, done):
        if "failed" in res:
            failed.append({"table": table, "seed": s, **({"member": m} if n_members > 1 else {}),
                           "error": res["failed"].splitlines()[-1]})
            continue
        assert res["best_step"] == updates, "the validation pass must be the last update's"
        finished.setdefault((table, s), []).append((out, url, res))
    for (table, s), runs in finished.items():
        if len(runs) < n_members:
            continue  # a member failed: the labelled set is recorded under "failed"
        accuracy = 100 * runs[0][2]["val_accuracy"] if n_members == 1 else ensemble_accuracy(runs, updates)
        per_table.setdefault(table, []).append(accuracy)
        members.setdefault(table, []).append([round(100 * res["val_accuracy"], 2) for *_, res in runs])
    return per_table, members, failed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--tables", default="magic_gamma,letter,satimage,shuttle,spambase")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--updates", type=int, default=2000)
    p.add_argument("--name", required=True, help="the candidate's name (its runs' folder)")
    p.add_argument("--method", default="ebm", choices=("ebm", "supervised", *BL.NEURAL))
    p.add_argument("--settings", default="", help="vat / pi: JSON merged over the baseline's fixed settings, "
                   "e.g. '{\"eps\": 0.05}'")
    p.add_argument("--members", type=int, default=1, help="initialisations per labelled set, each --updates "
                   "updates, scored by their averaged prediction (ours only)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--work", default="runs/screen")
    p.add_argument("--shards", default="runs/reproduce", help="<shards>/<table>/seed<s>/shards (launch/reproduce.py's)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    try:
        settings = baseline_settings(a.method, a.settings)
    except ValueError as e:
        p.error(str(e))
    if a.members < 1 or (a.members > 1 and a.method != "ebm"):
        p.error(f"--members {a.members}: give 1, or more than 1 with --method ebm")
    work = REPO / a.work
    jobs = []
    for table in a.tables.split(","):
        config = str(REPO / "configs" / f"{table}.yaml")
        raw = C.raw_tree(config, a.overrides)
        for s in range(a.seeds):
            url = make.ensure(C.from_dict(C.Config, C._merge(raw, {"data": {
                "shards": str(REPO / a.shards / table / f"seed{s}" / "shards"), "split_seed": s}})).data)
            for m in range(a.members):
                ov = [*a.overrides, f"train.steps={a.updates}", f"train.eval_every={a.updates}", "train.select=val",
                      "health.patience=0", f"data.shards={url}", f"data.split_seed={s}", f"train.seed={s + 1000 * m}",
                      *([] if settings is not None else [f"train.method={a.method}"])]
                jobs.append((table, s, m, config, ov, work / table / f"seed{s}" / member_name(a.name, m), url))
    logs = {(table, m): R.RunLog(work / table / f"{member_name(a.name, m)}.jsonl")
            for table in a.tables.split(",") for m in range(a.members)}

    def run(job) -> dict:
        table, s, m, config, ov, out, url = job
        try:
            if settings is not None:  # the one validation pass is at the last update, as for ours
                return R.neural_run(a.method, config, ov, url, s, "oracle-val", out, logs[table, m], settings)
            return R.train_run(config, ov, out, "ours", url, s, logs[table, m])
        except RuntimeError as err:
            print(f"{a.name}: {table} seed {s} failed; the screen goes on: {err}", file=sys.stderr, flush=True)
            return {"failed": str(err)}

    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        done = list(pool.map(run, jobs))
    per_table, members, failed = score(jobs, done, a.members, a.updates)
    row = {"name": a.name, "method": a.method, "updates": a.updates, "seeds": a.seeds, "overrides": a.overrides,
           **({"settings": settings} if settings is not None else {}),
           **({"members": a.members, "member_val_per_seed": members} if a.members > 1 else {}),
           "val": {t: round(statistics.fmean(v), 2) for t, v in per_table.items()},
           "val_per_seed": {t: [round(x, 2) for x in v] for t, v in per_table.items()},
           "mean": round(statistics.fmean(statistics.fmean(v) for v in per_table.values()), 2) if per_table else None,
           "failed": failed}
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "screen.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: row[k] for k in ("name", "val", "mean")}), flush=True)
    if failed:
        print(f"{a.name}: {len(failed)} of {len(jobs)} runs failed (see 'failed' in {work / 'screen.jsonl'}); "
              "the means cover the others; a candidate with a failed run is not one to adopt", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
