"""The speed benchmark runs on CPU and reports every figure as JSON: medians and spread over repeats, and a
profiled breakdown of one step whose parts cover the step and charge each backward op to its net."""

import json
import subprocess
import sys

from conftest import REPO

PARTS = ("data", "sampler", "encoder_forward", "generator_forward", "prior_forward", "other_forward", "health_check",
         "encoder_backward", "generator_backward", "prior_backward", "other_backward", "optimizer")


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ssl_ebm.bench", "--config", str(REPO / "configs" / "digits.yaml"),
                           *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_benchmark_reports_medians_spread_and_a_profiled_breakdown_on_cpu(digits_shards):
    proc = bench("--steps", "3", "--repeats", "3", "--warmup", "1", "--profile-steps", "3",
                 f"data.shards={digits_shards}", "model.hidden=32", "sampler.steps=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    for key in ("step_ms", "samples_per_s", "sampler_ms", "sampler_share", "eager_step_ms",
                "eager_over_captured_step", "end_to_end_samples_per_s", "end_to_end_over_step", "peak_memory_mb"):
        assert out[key] > 0, key
    assert out["device"] == "cpu" and out["sampler_backend"] == "static" and out["graph_captures"] == 1
    assert out["timing"] == {"steps": 3, "repeats": 3, "warmup": 1}
    for name in ("step", "sampler", "eager_step", "eager_sampler", "end_to_end_step"):
        repeats = out[f"{name}_ms_repeats"]
        assert len(repeats) == 3 and min(repeats) <= out[f"{name}_ms"] <= max(repeats), name
        assert abs(out[f"{name}_spread"] - (max(repeats) - min(repeats)) / out[f"{name}_ms"]) < 1e-3, name
    profile = out["profile"]
    assert profile["end_to_end"] and profile["steps"] == 3 and list(profile["parts"]) == list(PARTS)
    # The parts are the self times inside the step's ranges: together nearly the whole profiled step, never more.
    assert 0.5 * profile["step_ms_profiled"] <= profile["host_ms_total"] <= 1.05 * profile["step_ms_profiled"]
    # Backward ops are charged to the net whose forward made them (by autograd sequence number), not lumped.
    for net in ("encoder", "generator", "prior"):
        assert profile["parts"][f"{net}_backward"]["host_ms"] > 0, net


def test_bad_timing_flag_is_one_line():
    proc = bench("--repeats", "0")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --repeats is 0; use 1 or more"
