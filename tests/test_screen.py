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
