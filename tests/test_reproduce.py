"""launch/reproduce.py: the CI smoke versions (tiny steps, digits) of both protocols write the JSON and the table."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, TINY


def _reproduce(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "reproduce.py"), *args], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_realistic_protocol_is_the_default_and_never_reads_the_validation_split(tmp_path):
    """The default protocol on digits, every baseline, with the validation shards deleted before the run: it
    still runs (so nothing opened them), tests final weights, records the budgets, the paired interval and
    the verdict; a second run keeps every finished run; the doc block is replaced, not appended."""
    from shards.make import build

    doc = tmp_path / "RESULTS.md"
    doc.write_text("# Results\n\n## Training health (MAGIC, 5 seeds)\n\nkept as it is\n")
    work = tmp_path / "work"
    for s in (0, 1):  # the shards reproduce would build, less their validation split
        shards = work / "digits" / f"seed{s}" / "shards"
        build("digits", str(shards), num_labelled=100, seed=s)
        vals = list(shards.glob("val-*.tar"))
        assert vals and json.loads((shards / "manifest.json").read_text())["splits"]["val"]["count"] > 0
        for f in vals:
            f.unlink()
    args = ["--config", str(REPO / "configs" / "digits.yaml"), "--seeds", "2", "--work", str(work), "--results",
            str(tmp_path / "results"), "--doc", str(doc), "--ls-max-unlabelled", "300", "--updates", "8", *TINY]
    proc = _reproduce(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "realistic" / "digits.json").read_text())
    assert result["protocol"] == "realistic" and result["seeds"] == [0, 1] and result["updates"] == 8
    names = ["supervised", "vat", "pi", "lr", "rf", "gb", "self_training", "label_spreading"]
    assert result["baselines"] == names
    for run in result["runs"]:
        assert run["ours"]["select"] == "final" and run["ours"]["val_accuracy"] is None
        assert run["vat"]["select"] == "final" and run["vat"]["settings"] == {"xi": 0.1, "eps": 0.1, "weight": 1.0,
                                                                               "entmin": 0.0}
        for name in ("lr", "rf", "gb", "self_training", "label_spreading"):
            assert "val_accuracy" not in run[name] and run[name]["cv_accuracy"] == max(
                c["cv_accuracy"] for c in run[name]["candidates"]), name
        for name in ("ours", *names):
            assert 0.0 <= run[name]["test_accuracy"] <= 1.0, name
    # equal budgets for every network method, each recorded with what chose its setting
    for name in ("ours", "supervised", "vat", "pi"):
        assert result["budgets"][name] == {"updates": 8, "restarts": 1, "settings_tried": 1,
                                           "chosen_by": "fixed settings; the weights at the end of training"}
    assert result["budgets"]["lr"]["settings_tried"] == 5 and "cross-validation" in result["budgets"]["lr"]["chosen_by"]
    # the paired comparison against the best baseline by mean
    best = max(names, key=lambda n: result[n]["mean"])
    diffs = [a - b for a, b in zip(result["ours"]["values"], result[best]["values"])]
    assert result["best_baseline"] == best and result["paired"]["diffs"] == diffs
    assert result["verdict"] in ("wins", "level", "loses") and result["paired_supervised"]["baseline"] == "supervised"
    text = doc.read_text()
    assert "## Training health (MAGIC, 5 seeds)\n\nkept as it is" in text and "### Realistic protocol" in text
    assert f"| digits | 100 | 2 | 8 | {result['ours']['mean']:.1f}" in text
    # again, with the run folders gone (another checkout or session): every finished run is kept from the run
    # log written beside the results, the block replaced
    runs_log = tmp_path / "results" / "realistic" / "runs" / "digits.jsonl"
    assert len(runs_log.read_text().splitlines()) == 2 * 5  # per seed: ours, supervised, vat, pi, scikit-learn
    for s in (0, 1):
        shutil.rmtree(work / "digits" / f"seed{s}" / "realistic")
    again = _reproduce(args)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads((tmp_path / "results" / "realistic" / "digits.json").read_text())["runs"]
    assert all(r[m]["reused"] for r in rerun for m in ("ours", "supervised", "vat", "pi", "lr", "label_spreading"))
    assert rerun[0]["ours"]["test_accuracy"] == result["runs"][0]["ours"]["test_accuracy"]
    assert doc.read_text().count("reproduce:begin") == 1


def test_oracle_val_protocol_chooses_on_validation_and_searches_vats_weight(tmp_path):
    """--protocol oracle-val: the settings and checkpoints chosen on validation, VAT's grid with the weight of
    its term; the row goes to results/oracle_val/ and the doc's oracle table, labelled as such."""
    args = ["--config", str(REPO / "configs" / "digits.yaml"), "--seeds", "1", "--protocol", "oracle-val",
            "--baselines", "supervised,vat,lr", "--work", str(tmp_path / "work"), "--results",
            str(tmp_path / "results"), "--doc", str(tmp_path / "RESULTS.md"), "--updates", "4", *TINY,
            "train.eval_every=2", "data.batch_unlabelled=16"]
    proc = _reproduce(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "oracle_val" / "digits.json").read_text())
    run = result["runs"][0]
    assert result["protocol"] == "oracle-val" and run["ours"]["select"] == "val" and run["ours"]["val_accuracy"] >= 0
    assert {c["weight"] for c in run["vat"]["candidates"]} == {1.0, 3.0} and len(run["vat"]["candidates"]) == 12
    assert run["vat"]["val_accuracy"] == max(c["val_accuracy"] for c in run["vat"]["candidates"])
    assert run["lr"]["val_accuracy"] == max(c["val_accuracy"] for c in run["lr"]["candidates"])
    assert result["budgets"]["vat"]["settings_tried"] == 12 and result["budgets"]["ours"]["settings_tried"] == 1
    text = (tmp_path / "RESULTS.md").read_text()
    assert "### Oracle-val protocol (for comparison with papers)" in text and "### Realistic protocol" not in text


def test_reproduce_bad_config_is_one_line(tmp_path):
    proc = _reproduce(["--config", str(tmp_path / "nope.yaml")], timeout=120)
    assert proc.returncode == 2 and "not found" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_baselines_settings_from_another_method_is_one_line(tmp_path):
    other = tmp_path / "pi.json"
    other.write_text(json.dumps({"method": "pi", "settings": {"w": 1.0, "noise": 0.15, "dropout": 0.1}}))
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "baselines.py"), "--config",
                           str(REPO / "configs" / "digits.yaml"), "--shards", str(tmp_path / "none"), "--method", "vat",
                           "--settings-from", str(other)], check=False, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "not a vat result" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("extra, message", [
    (["--settings", '{"xi": 0.1, "eps": 0.05}'], "needs exactly the keys entmin, eps, weight, xi; got eps, xi"),
    (["--settings", "{eps"], "is not JSON"),
    (["--settings", '{"w": 1.0, "noise": 0.15, "dropout": 0.2}', "--settings-from", "x.json"], "pass one of them"),
])
def test_baselines_bad_settings_are_one_line(tmp_path, extra, message):
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "baselines.py"), "--config",
                           str(REPO / "configs" / "digits.yaml"), "--shards", str(tmp_path / "none"), "--method", "vat",
                           *extra], check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_reproduce_unknown_baseline_is_one_line(tmp_path):
    proc = _reproduce(["--config", str(REPO / "configs" / "digits.yaml"), "--baselines", "lr,svm"], timeout=120)
    assert proc.returncode == 2 and "'svm'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_variant_names_the_feature_scaling():
    sys.path.insert(0, str(REPO / "launch"))
    import reproduce
    from ssl_ebm import config as C

    spambase = C.load_config(str(REPO / "configs" / "spambase.yaml"), ["data.features=quantile"])
    assert reproduce.variant(spambase).endswith(", quantile features, 2,000 updates")
    assert "features" not in reproduce.variant(C.load_config(str(REPO / "configs" / "magic_gamma.yaml")))


def test_every_tabular_config_names_only_its_data_and_label_count():
    """One set of defaults: a config on configs/tabular.yaml sets data keys and its run folder, nothing else."""
    import yaml

    shared = (REPO / "configs" / "tabular.yaml").resolve()
    tables = [p for p in sorted([*(REPO / "configs").glob("*.yaml"), *(REPO / "configs" / "outside").glob("*.yaml")])
              if (base := yaml.safe_load(p.read_text()).get("base")) and (p.parent / base).resolve() == shared]
    assert len(tables) >= 19  # the twelve shared tables and the seven outside ones
    for path in tables:
        raw = yaml.safe_load(path.read_text())
        assert set(raw) <= {"base", "data", "train"}, path.name
        assert set(raw.get("train", {})) <= {"out_dir"}, path.name
        assert "features" not in raw["data"], path.name


def test_a_key_added_at_its_default_keeps_a_logged_run():
    """A run logged before model.label_smoothing existed is still this config's run while the key is at its
    default (0); at another value it is a different run."""
    sys.path.insert(0, str(REPO / "launch"))
    import reproduce

    config = str(REPO / "configs" / "magic_gamma.yaml")
    now = {"method": "ours", "config": reproduce.run_config(config, [])}
    logged = json.loads(json.dumps(now))
    del logged["config"]["model"]["label_smoothing"]
    assert reproduce.same_stamp(logged, now)
    changed = {"method": "ours", "config": reproduce.run_config(config, ["model.label_smoothing=0.1"])}
    assert not reproduce.same_stamp(logged, changed)
    assert not reproduce.same_stamp({**logged, "method": "supervised"}, now)


def test_the_mixed_likelihood_on_a_table_of_numbers_keeps_the_gaussian_runs(digits_shards):
    """The tabular default "mixed" trains a table without categorical columns with the Gaussian likelihood
    (ssl_ebm/likelihood.py), so its stamp is the Gaussian one's and the runs logged with that are kept."""
    sys.path.insert(0, str(REPO / "launch"))
    import reproduce

    config = str(REPO / "configs" / "tabular.yaml")
    assert reproduce.C.load_config(config).model.likelihood == "mixed"
    mixed = reproduce.run_config(config, [], "ours", digits_shards)
    assert mixed == reproduce.run_config(config, ["model.likelihood=gaussian"], "ours", digits_shards)
    assert mixed["model"]["likelihood"] == "gaussian"
    assert reproduce.run_config(config, [], "ours")["model"]["likelihood"] == "mixed"  # no shards: as configured
