"""launch/gpu_check.py in its CPU smoke mode: the three parts run for real and one JSON of figures comes out."""

import json
import subprocess
import sys

from conftest import REPO


def test_cpu_smoke_runs_all_three_parts_and_writes_the_figures(digits_shards, tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "gpu_check.py"), "--cpu-smoke", "--out", str(out),
         "--shards", digits_shards, "--work", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    result = json.loads(out.read_text())
    assert proc.returncode == 0 and result["ok"], json.dumps(result, indent=1)[-4000:]
    assert result["mode"] == "cpu-smoke" and result["machine"]["device"] == "cpu"
    bench = result["bench"]
    assert bench["sampler_backend"] == "static" and bench["graph_captures"] == 1
    for key in ("step_ms", "samples_per_s", "eager_step_ms", "end_to_end_samples_per_s", "peak_memory_mb"):
        assert bench[key] > 0, key
    for part, steps in (("short", [2, 4, 6]), ("zero2", [2, 4])):
        figures = result[part]
        assert figures["logged_steps"] == steps, (part, figures)
        assert figures["steps_per_s"] > 0 and figures["samples_per_s"] > 0, part
        tested = json.loads((tmp_path / "work" / part / "metrics.json").read_text())["test"]  # what the run measured
        assert figures["test_accuracy"] == tested["accuracy"] and tested["count"] == 359 and \
            abs(359 * tested["accuracy"] - round(359 * tested["accuracy"])) < 1e-3 and figures["nan_skips"] == 0, part
    assert "zero2.yaml" in result["zero2"]["command"] and "model.encoder=mlp" in result["zero2"]["command"]
    assert "train.mixed_precision=bf16" in result["short"]["command"]


def test_unknown_part_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "gpu_check.py"), "--cpu-smoke",
                           "--parts", "bench,zero9", "--out", str(tmp_path / "x.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: --parts: unknown part(s) ['zero9']; choose from bench, short, zero2")
