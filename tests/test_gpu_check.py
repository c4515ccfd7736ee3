"""launch/gpu_check.py in its CPU smoke mode: the parts run for real and one JSON of figures comes out."""

import json
import subprocess
import sys

import pytest
from conftest import REPO
from shard_files import write_cifar_python


def test_cpu_smoke_runs_all_three_parts_and_writes_the_figures(digits_shards, tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "gpu_check.py"), "--cpu-smoke", "--out", str(out),
         "--shards", digits_shards, "--work", str(tmp_path / "work"), "--parts", "bench,short,zero2"],
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
        "error: --parts: unknown part(s) ['zero9']; choose from bench, cifar, short, zero2")


def test_cpu_smoke_of_the_acceptance_builds_the_shards_benches_and_time_boxes_both_arms(tmp_path):
    """The GPU acceptance's own path, tiny: CIFAR-10 shards built from a source in the official format, the
    bench through the uint8 input pipeline, then ours and the supervised twin each stopped by the signal
    after their time box and tested from the checkpoint they wrote."""
    write_cifar_python(tmp_path / "src", per_batch=60, n_test=30)
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "gpu_check.py"), "--cpu-smoke", "--source", str(tmp_path / "src"),
         "--out", str(out), "--work", str(tmp_path / "work"), "--train-minutes", "0.05"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    result = json.loads(out.read_text())
    assert proc.returncode == 0 and result["ok"], json.dumps(result, indent=1)[-4000:]
    assert result["parts"] == ["bench", "cifar"] and result["config"] == "configs/cifar10.yaml"
    assert result["shards"]["dataset"] == "cifar10" and result["shards"]["labelled"] == 20
    assert result["shards"]["url"].startswith(str(tmp_path / "work"))  # a smoke build never lands in data_cache/
    bench = result["bench"]
    assert len(bench["step_ms_repeats"]) == 3 and bench["end_to_end_over_step"] > 0
    assert bench["profile"]["end_to_end"] and "data" in bench["profile"]["parts"]
    cifar = result["cifar"]
    for arm in ("ours", "supervised"):
        figures = cifar[arm]
        assert figures["ok"] and figures["stop_signal_at_s"] > 0, arm  # stopped by the time box, not by train.steps
        assert abs(figures["train_s"] - 3.0) < 2.0 and figures["updates"] > 0, (arm, figures)
        assert figures["updates_per_s"] == pytest.approx(figures["updates"] / figures["train_s"]), arm
        assert 0.0 <= figures["test_accuracy"] <= 1.0 and figures["nan_skips"] == 0, arm
    assert "train.method=supervised" in cifar["supervised"]["command"] and "train.method=ebm" in cifar["ours"]["command"]
    schedule = cifar["paper_schedule"]
    assert schedule["updates"] == 400_000
    assert abs(schedule["hours_at_ours_steady_speed"] - 400_000 / cifar["ours"]["updates_per_s_steady"] / 3600) < 1e-9


@pytest.mark.parametrize("args, line", [
    (["--source", "{tmp}/none"], "error: no CIFAR-10 source at {tmp}/none: pass --source (cifar-10-python.tar.gz or "
                                 "its folder, or the cifar10_jpeg folder) or --shards URL of built shards"),
    (["--shards", "{tmp}/none"], "error: no readable shards at {tmp}/none (FileNotFoundError: [Errno 2] No such file "
                                 "or directory: '{tmp}/none/manifest.json'); pass --shards the URL of a directory "
                                 "built by `python -m shards.make`, or --source to build them"),
    (["--train-minutes", "0"], "error: --train-minutes is 0.0; give each CIFAR-10 arm a time above 0"),
])
def test_bad_input_is_one_line(tmp_path, args, line):
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "gpu_check.py"), "--cpu-smoke",
                           *(a.format(tmp=tmp_path) for a in args), "--out", str(tmp_path / "x.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == line.format(tmp=tmp_path)
