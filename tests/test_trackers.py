"""train.log_with: any tracker Accelerate supports; TensorBoard (the default) and MLflow (a local file store, offline)."""

from __future__ import annotations

import os

import pytest
from conftest import REPO, TINY, run_train

from ssl_ebm import config as C
from ssl_ebm import runtime

DIGITS = str(REPO / "configs" / "digits.yaml")


def test_tensorboard_and_mlflow_both_receive_the_losses(digits_shards, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    run_train(["--config", DIGITS, *TINY, f"data.shards={digits_shards}", f"train.out_dir={out}", "train.steps=10",
               "train.log_with=tensorboard,mlflow"], env={"MLFLOW_TRACKING_URI": ""})
    assert list((out / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # reading the store from this process
    client = MlflowClient((out / "mlruns").as_uri())  # the default store: in the run directory, no server
    (exp,) = [e for e in client.search_experiments() if e.name == "ssl_ebm"]
    (run,) = client.search_runs([exp.experiment_id])
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [5, 10]  # train.log_every=5
    assert "val/accuracy" in run.data.metrics and run.data.params["method"] == "ebm"


def test_no_tracker(digits_shards, tmp_path):
    out = tmp_path / "run"
    run_train(["--config", DIGITS, *TINY, f"data.shards={digits_shards}", f"train.out_dir={out}", "train.steps=5",
               "train.log_with=none"])
    assert (out / "metrics.json").is_file() and not list(out.rglob("events.out.tfevents.*"))


@pytest.mark.parametrize("value, fragment", [("tensorbored", "unknown tracker 'tensorbored'"), ("", "train.log_with")])
def test_bad_tracker_is_one_line(value, fragment):
    with pytest.raises(C.ConfigError, match=fragment):
        runtime.trackers(C.load_config(DIGITS, [f"train.log_with={value}"]))


def test_bad_tracker_stops_the_run_with_one_line(digits_shards, tmp_path):
    proc = run_train(["--config", DIGITS, *TINY, f"data.shards={digits_shards}", f"train.out_dir={tmp_path}",
                      "train.log_with=tensorboard,nosuch"], check=False)
    assert proc.returncode != 0 and "train.log_with: unknown tracker 'nosuch'" in proc.stderr
    assert len([ln for ln in proc.stderr.strip().splitlines() if "Traceback" in ln]) == 0, proc.stderr
