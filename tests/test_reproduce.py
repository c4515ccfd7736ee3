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
    assert "prior lr 0.0003" in result["variant"]  # configs/digits.yaml's optim.lr_prior
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


def test_reproduce_every_baseline_on_the_same_shards(tmp_path):
    """--baselines all on digits: every baseline runs on seed 0's shards, its setting chosen on validation,
    and the verdict names the best one; --ours-from then reuses ours and checks the shards."""
    doc = tmp_path / "RESULTS.md"
    common = ["--config", str(REPO / "configs" / "digits.yaml"), "--seeds", "1", "--work", str(tmp_path / "work"),
              "--results", str(tmp_path / "results"), "--doc", str(doc), "--ls-max-unlabelled", "300"]
    tiny = [*TINY, "train.steps=10", "train.eval_every=5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "reproduce.py"), *common, "--baselines", "all",
                           *tiny], check=False, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "digits.json").read_text())
    names = ["supervised", "label_spreading", "lr", "rf", "gb", "self_training", "vat", "pi"]
    assert result["baselines"] == names
    run = result["runs"][0]
    for name in names:
        assert 0.0 <= run[name]["test_accuracy"] <= 1.0, name
        if "candidates" in run[name]:  # the chosen setting is the one best on validation
            assert run[name]["val_accuracy"] == max(c["val_accuracy"] for c in run[name]["candidates"]), name
    assert len(run["vat"]["candidates"]) == 6 and len(run["pi"]["candidates"]) == 6
    assert run["vat"]["steps"] == 10 and run["self_training"]["settings"]["base"] in ("lr", "rf")
    # the verdict is against the best baseline by mean, whichever it is
    best = max(names, key=lambda n: result[n]["mean"])
    assert result["best_baseline"] == best
    row = next(line for line in doc.read_text().splitlines() if line.startswith("| digits |"))
    assert ("beats the best baseline" if result["ours"]["mean"] > result[best]["mean"] else "does not beat") in row
    sys.path.insert(0, str(REPO / "launch"))
    from baselines import NAMES

    assert NAMES[best] in row.split(" | ")[-3]  # the verdict cell names it

    # --ours-from: ours is taken from that file, label spreading must agree seed for seed
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps(result))
    again = subprocess.run([sys.executable, str(REPO / "launch" / "reproduce.py"), *common, "--baselines", "lr",
                            "--ours-from", str(earlier), *tiny], check=False, cwd=REPO, capture_output=True,
                           text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    reused = json.loads((tmp_path / "results" / "digits.json").read_text())
    assert reused["runs"][0]["ours"]["test_accuracy"] == run["ours"]["test_accuracy"]
    assert reused["baselines"] == ["supervised", "label_spreading", "lr"]
    result["runs"][0]["label_spreading"]["test_accuracy"] += 0.01  # as if the shards had been different
    earlier.write_text(json.dumps(result))
    bad = subprocess.run([sys.executable, str(REPO / "launch" / "reproduce.py"), *common, "--baselines", "lr",
                          "--ours-from", str(earlier), *tiny], check=False, cwd=REPO, capture_output=True,
                         text=True, timeout=600, env=env)
    assert bad.returncode == 2 and "shards differ" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_reproduce_neural_grid_on_the_first_seed_only_and_restarts(tmp_path):
    """--neural-grid first-seed: seed 0 searches the VAT grid, seed 1 runs only the setting seed 0's
    validation chose, for --neural-steps updates. --restarts 2: ours and VAT train twice per seed from
    different initialisations (train.seed s and s + 1000, the same labelled set) and each keeps the run
    best on validation; VAT's restart trains its seed's chosen setting. --reuse then keeps every finished
    run when only a comment of the config changed."""
    config = tmp_path / "digits.yaml"
    config.write_text((REPO / "configs" / "digits.yaml").read_text())
    cmd = [sys.executable, str(REPO / "launch" / "reproduce.py"), "--config", str(config), "--seeds", "2",
           "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results"),
           "--doc", str(tmp_path / "RESULTS.md"), "--ls-max-unlabelled", "300", "--baselines",
           "label_spreading,vat", "--neural-steps", "6", "--neural-grid", "first-seed", "--jobs", "2", "--restarts", "2",
           *TINY, "train.steps=4", "train.eval_every=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "digits.json").read_text())
    work = tmp_path / "work" / "digits"
    first, second = (json.loads((work / f"seed{s}" / "vat" / "result.json").read_text()) for s in (0, 1))
    assert len(first["candidates"]) == 6 and first["steps"] == 6
    assert len(second["candidates"]) == 1 and second["settings"] == first["settings"] and second["steps"] == 6
    assert second["settings_from"].endswith("seed0/vat/result.json")
    assert result["neural_steps"] == 6 and result["neural_grid"] == "first-seed"
    assert "--neural-grid first-seed" in result["command"] and "--restarts 2" in result["command"]
    row = next(line for line in (tmp_path / "RESULTS.md").read_text().splitlines() if line.startswith("| digits |"))
    assert "VAT / Π-model: 6 updates, grid on seed 0 only" in row
    assert result["restarts"] == 2 and result["variant"].endswith("best of 2 initialisations on validation")
    assert "best of 2 initialisations on validation; VAT / Π-model" in row

    for s, run in enumerate(result["runs"]):
        for method in ("ours", "vat"):
            kept, restarts = run[method], run[method]["restarts"]
            assert [r["train_seed"] for r in restarts] == [s, s + 1000], method
            assert kept["val_accuracy"] == max(r["val_accuracy"] for r in restarts), method
            assert kept["test_accuracy"] == restarts[kept["restart"]]["test_accuracy"], method
        assert f"seed: {s + 1000}" in (work / f"seed{s}" / "ours-r1" / "config.yaml").read_text()
        assert f"split_seed: {s}" in (work / f"seed{s}" / "ours-r1" / "config.yaml").read_text()
        restart = json.loads((work / f"seed{s}" / "vat-r1" / "result.json").read_text())
        assert len(restart["candidates"]) == 1 and restart["settings"] == first["settings"]
        assert restart["settings_from"].endswith(f"seed{s}/vat/result.json")
    assert result["ours"]["values"] == [100 * r["ours"]["test_accuracy"] for r in result["runs"]]

    config.write_text(config.read_text().replace("# The embedded default", "# Edited comment: the embedded default"))
    again = subprocess.run([*cmd, "--reuse"], check=False, cwd=REPO, capture_output=True, text=True, timeout=600,
                           env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    for run in json.loads((tmp_path / "results" / "digits.json").read_text())["runs"]:
        assert run["ours"]["reused"] and run["vat"]["reused"]
    sys.path.insert(0, str(REPO / "launch"))
    import reproduce

    done = work / "seed0" / "ours" / "command.json"
    stamp = json.loads(done.read_text())
    assert reproduce._same_stamp(done, stamp)
    changed = {**stamp, "config_text": stamp["config_text"].replace("obs_sigma: 0.3", "obs_sigma: 0.5")}
    assert not reproduce._same_stamp(done, changed)  # a real change trains again
    assert not reproduce._same_stamp(done, {**stamp, "args": stamp["args"][:-1]})

    # --race 2: ours trains both initialisations for 2 updates, continues the better one on validation to
    # train.steps; VAT comes from the results file above (--neural-from), its shards checked by label spreading.
    # Ours adds settings VAT never reads (the VAT term of our loss, the prior's learning rate): still accepted.
    earlier = tmp_path / "results" / "digits.json"
    race = [*cmd[:cmd.index("--baselines")], "--baselines", "label_spreading", "--jobs", "2", "--restarts", "2",
            "--race", "2", "--neural-from", str(earlier), "--name", "digits_race", *TINY, "train.steps=4",
            "train.eval_every=2", "model.vat_weight=1", "optim.lr_prior=2e-5"]
    proc = subprocess.run(race, check=False, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    raced = json.loads((tmp_path / "results" / "digits_race.json").read_text())
    assert raced["race"] == 2 and "--race 2 --neural-from" in raced["command"]
    assert raced["variant"].endswith("2 initialisations raced for 2 updates, the best on validation continued")
    assert "no MI, labelled weight 10, prior lr 2e-05, + VAT term 1 (xi 0.1, eps 0.1), 4 updates" in raced["variant"]
    before = json.loads(earlier.read_text())
    for s, run in enumerate(raced["runs"]):
        ours = run["ours"]
        assert [t["train_seed"] for t in ours["race"]] == [s, s + 1000]
        assert all(t["best_step"] <= 2 for t in ours["race"])
        paused_val = [t["val_accuracy"] for t in ours["race"]]
        assert ours["restart"] == paused_val.index(max(paused_val)) and ours["train_seed"] == s + 1000 * ours["restart"]
        assert ours["val_accuracy"] >= max(paused_val)  # the winner's whole run, its pause included
        winner = tmp_path / "work" / "digits_race" / f"seed{s}" / ("ours" if ours["restart"] == 0 else "ours-r1")
        assert "at step 2" in (winner / "continue.log").read_text()
        assert json.loads((winner / "metrics.json").read_text())["steps"] == 4 and "paused_at" not in ours
        assert run["vat"]["test_accuracy"] == before["runs"][s]["vat"]["test_accuracy"]
        assert run["vat"]["from"] == str(earlier)
    row = next(line for line in (tmp_path / "RESULTS.md").read_text().splitlines()
               if line.startswith("| digits_race (digits) |"))
    assert "VAT / Π-model: 6 updates, grid on seed 0 only, best of 2 initialisations on validation" in row
    at = race.index("--race") + 1
    bad = subprocess.run([*race[:at], "4", *race[at + 1:]], check=False, cwd=REPO, capture_output=True,
                         text=True, timeout=600, env=env)
    assert bad.returncode == 2 and "--race 4: must be below train.steps (4)" in bad.stderr
    wider = subprocess.run([*race, "model.hidden=32", "optim.lr_encoder=1e-4"], check=False, cwd=REPO,
                           capture_output=True, text=True, timeout=600, env=env)  # VAT's own encoder and lr differ
    assert wider.returncode == 2 and len(wider.stderr.strip().splitlines()) == 1
    assert "differs from this command's in model.hidden, optim.lr_encoder;" in wider.stderr


def test_baselines_settings_from_another_method_is_one_line(tmp_path):
    other = tmp_path / "pi.json"
    other.write_text(json.dumps({"method": "pi", "settings": {"w": 1.0, "noise": 0.15, "dropout": 0.1}}))
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "baselines.py"), "--config",
                           str(REPO / "configs" / "digits.yaml"), "--shards", str(tmp_path / "none"), "--method", "vat",
                           "--settings-from", str(other)], check=False, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "not a vat result" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_reproduce_unknown_baseline_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "reproduce.py"), "--config",
                           str(REPO / "configs" / "digits.yaml"), "--baselines", "lr,svm"], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "'svm'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_verdict_counts_a_float_difference_as_level_not_a_win():
    sys.path.insert(0, str(REPO / "launch"))
    import reproduce

    def row(ours, vat):
        return {"ours": {"mean": ours}, "vat": {"mean": vat}, "rf": {"mean": 50.0}}

    # shuttle's 5-seed row: the same test examples right, float32 rounding apart
    assert reproduce.verdict(row(95.37931084632874, 95.37930965423584)).startswith("**level with VAT**")
    assert reproduce.verdict(row(95.5, 95.4)).startswith("beats the best of the 2 baselines run (VAT)")
    assert reproduce.verdict(row(95.3, 95.4)).startswith("**does not beat VAT**")


def test_variant_names_the_feature_scaling():
    sys.path.insert(0, str(REPO / "launch"))
    import reproduce
    from ssl_ebm import config as C

    spambase = C.load_config(str(REPO / "configs" / "spambase.yaml"))
    assert reproduce.variant(spambase).endswith(", quantile features, 4,000 updates")
    assert "features" not in reproduce.variant(C.load_config(str(REPO / "configs" / "magic_gamma.yaml")))
