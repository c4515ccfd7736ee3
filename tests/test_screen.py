"""launch/screen.py: a candidate's failed run is recorded and the screen goes on."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_DATA


@pytest.mark.skipif(not (SHARED_DATA / "magic_gamma").is_dir(),
                    reason=f"{SHARED_DATA}/magic_gamma (the shared real tables) is absent")
def test_a_failed_run_is_recorded_and_the_screen_goes_on(tmp_path):
    # The watchdog gives up at once (any energy gap is too large, no recovery allowed): both seeds' runs fail,
    # as a diverging prior's would. The screen still finishes the other, writes its row and exits 0.
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "screen.py"), "--tables", "magic_gamma", "--seeds", "2",
         "--updates", "20", "--jobs", "2", "--name", "diverges", "--work", str(tmp_path / "work"),
         "--shards", str(tmp_path / "shards"), "health.max_energy_gap=1e-9", "health.max_recoveries=0",
         "train.log_every=5"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads((tmp_path / "work" / "screen.jsonl").read_text().splitlines()[-1])
    assert row["name"] == "diverges" and row["mean"] is None and row["val"] == {}
    assert [(f["table"], f["seed"]) for f in row["failed"]] == [("magic_gamma", 0), ("magic_gamma", 1)]
    assert all("watchdog gave up" in f["error"] for f in row["failed"])
    assert "2 of 2 runs failed" in proc.stdout


@pytest.mark.skipif(not (SHARED_DATA / "magic_gamma").is_dir(),
                    reason=f"{SHARED_DATA}/magic_gamma (the shared real tables) is absent")
def test_a_baseline_is_screened_with_its_settings_and_read_back(tmp_path):
    # --method vat runs launch/baselines.py's VAT at its fixed settings with --settings merged over them, scored by
    # the final weights' validation accuracy; its output (which names the test figure) is not shown. A second
    # screen with the same command reads the finished run back; another radius trains again.
    def screen(name, settings):
        proc = subprocess.run(
            [sys.executable, str(REPO / "launch" / "screen.py"), "--tables", "magic_gamma", "--seeds", "1",
             "--updates", "10", "--jobs", "1", "--method", "vat", "--settings", settings, "--name", name,
             "--work", str(tmp_path / "work"), "--shards", str(tmp_path / "shards")],
            cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "test" not in proc.stdout
        return json.loads((tmp_path / "work" / "screen.jsonl").read_text().splitlines()[-1])

    run = tmp_path / "work" / "magic_gamma" / "seed0"
    row = screen("eps005", '{"eps": 0.05}')
    assert row["method"] == "vat" and row["failed"] == []
    assert row["settings"] == {"xi": 0.1, "eps": 0.05, "weight": 1.0, "entmin": 0.0}
    result = json.loads((run / "eps005" / "result.json").read_text())
    assert result["settings"]["eps"] == 0.05 and result["best_step"] == 10
    assert row["val_per_seed"]["magic_gamma"] == [round(100 * result["val_accuracy"], 2)]
    mtime = (run / "eps005" / "result.json").stat().st_mtime_ns
    assert screen("eps005", '{"eps": 0.05}')["val"] == row["val"]
    assert (run / "eps005" / "result.json").stat().st_mtime_ns == mtime  # read back, not trained again
    screen("eps005", '{"eps": 0.3}')
    assert json.loads((run / "eps005" / "result.json").read_text())["settings"]["eps"] == 0.3


def test_settings_are_checked_before_any_run(tmp_path):
    def fails(*args):
        proc = subprocess.run([sys.executable, str(REPO / "launch" / "screen.py"), "--name", "x",
                               "--work", str(tmp_path / "work"), *args],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and not (tmp_path / "work").exists()
        return proc.stderr
    assert "unknown vat setting(s) epsx; known: xi, eps, weight, entmin" in fails("--method", "vat", "--settings",
                                                                                  '{"epsx": 1}')
    assert "is not JSON" in fails("--method", "pi", "--settings", "{w")
    assert "--settings is for --method vat or pi, not ebm" in fails("--settings", '{"eps": 1}')


@pytest.mark.skipif(not (SHARED_DATA / "magic_gamma").is_dir(),
                    reason=f"{SHARED_DATA}/magic_gamma (the shared real tables) is absent")
def test_members_are_scored_by_their_averaged_prediction(tmp_path):
    # --members 2: two initialisations of the same labelled set, each --updates updates; the row's accuracy is
    # that of the members' averaged p(y|x) on validation, each member's own accuracy kept beside it.
    import torch

    from ssl_ebm import api

    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "screen.py"), "--tables", "magic_gamma", "--seeds", "1",
         "--updates", "10", "--jobs", "2", "--members", "2", "--name", "ens", "--work", str(tmp_path / "work"),
         "--shards", str(tmp_path / "shards"), "train.log_every=5"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test" not in proc.stdout
    row = json.loads((tmp_path / "work" / "screen.jsonl").read_text().splitlines()[-1])
    assert row["members"] == 2 and row["failed"] == []
    run = tmp_path / "work" / "magic_gamma" / "seed0"
    outs = [run / "ens", run / "ens-m1"]
    metrics = [json.loads((out / "metrics.json").read_text()) for out in outs]
    assert [m["best_step"] for m in metrics] == [10, 10]
    assert row["member_val_per_seed"]["magic_gamma"] == [[round(100 * m["val_accuracy"], 2) for m in metrics]]
    seeds = [json.loads((out / "command.json").read_text())["config"]["train"]["seed"] for out in outs]
    assert seeds == [0, 1000]  # two initialisations, one labelled set
    shards = str(tmp_path / "shards" / "magic_gamma" / "seed0" / "shards")
    x, y = api.read_examples(shards, "val")
    probas = [api.load(str(out / "checkpoints" / "best-000010"), allow_pickle=True, shards=shards).predict_proba(x)
              for out in outs]
    for proba, m in zip(probas, metrics):  # the loaded members predict as their own validation pass scored them
        assert abs(float((proba.argmax(-1) == y).float().mean()) - m["val_accuracy"]) < 1.5 / len(y)
    mean = float(((probas[0] + probas[1]).argmax(-1) == y).float().mean())
    assert row["val_per_seed"]["magic_gamma"] == [round(100 * mean, 2)]
    assert not torch.equal(probas[0], probas[1])


def test_members_are_for_ours_only(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "screen.py"), "--name", "x", "--members", "2",
                           "--method", "vat", "--work", str(tmp_path / "work")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--members 2: give 1, or more than 1 with --method ebm" in proc.stderr
    assert not (tmp_path / "work").exists()
