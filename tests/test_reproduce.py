"""launch/reproduce.py: the CI smoke version (one seed, tiny steps, digits) writes the JSON and the table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO, TINY


def test_reproduce_smoke_writes_results_and_table(tmp_path):
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# Results\n\n## Training health (MAGIC, 5 seeds)\n\nkept as it is\n")
    cmd = [sys.executable, str(REPO / "launch" / "reproduce.py"), "--config", str(REPO / "configs" / "digits.yaml"),
           "--seeds", "1", "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results"),
           "--doc", str(doc), "--ls-max-unlabelled", "500", *TINY, "train.steps=10"]
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "digits.json").read_text())
    assert result["dataset"] == "digits" and result["labels"] == 100 and result["seeds"] == [0]
    run = result["runs"][0]
    for method in ("ours", "supervised", "label_spreading"):
        assert 0.0 <= run[method]["test_accuracy"] <= 1.0, method
        assert result[method]["values"] == [100 * run[method]["test_accuracy"]]
    assert "persistent 5 x 0.6" in result["variant"] and "no MI" in result["variant"]
    # all three used the one shard directory of seed 0: the same labelled examples
    shards = run["shards"]
    for method in ("ours", "supervised"):
        cfg = (tmp_path / "work" / "digits" / "seed0" / method / "config.yaml").read_text()
        assert f"shards: {shards}" in cfg and "split_seed: 0" in cfg
    text = doc.read_text()
    assert "## Training health (MAGIC, 5 seeds)\n\nkept as it is" in text
    assert "| digits | 100 |" in text and "reproduce:begin" in text
    # again with --reuse: the finished runs are kept, and the block is replaced, not appended
    subprocess.run([*cmd, "--reuse"], cwd=REPO, capture_output=True, text=True, timeout=600, check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    again = json.loads((tmp_path / "results" / "digits.json").read_text())["runs"][0]
    assert again["ours"]["reused"] and again["supervised"]["reused"]
    assert again["ours"]["test_accuracy"] == run["ours"]["test_accuracy"]
    assert doc.read_text().count("reproduce:begin") == 1


def test_reproduce_bad_config_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "reproduce.py"), "--config",
                           str(tmp_path / "nope.yaml")], check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not found" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
