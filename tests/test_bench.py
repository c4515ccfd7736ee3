"""The speed benchmark runs on CPU and reports every figure as JSON."""

import json
import subprocess
import sys

from conftest import REPO


def test_benchmark_reports_json_on_cpu(digits_shards):
    proc = subprocess.run(
        [sys.executable, "-m", "ssl_ebm.bench", "--config", str(REPO / "configs" / "digits.yaml"), "--steps", "3",
         "--warmup", "1", f"data.shards={digits_shards}", "model.hidden=32", "sampler.steps=5"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    for key in ("step_ms", "samples_per_s", "sampler_ms", "sampler_share", "eager_step_ms",
                "eager_over_captured_step", "end_to_end_samples_per_s", "peak_memory_mb"):
        assert out[key] > 0, key
    assert out["device"] == "cpu" and out["sampler_backend"] == "static" and out["graph_captures"] == 1
