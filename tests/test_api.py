"""ssl_ebm/api.py end to end on the digits default: load, predict, encode, sample, generate, score, export;
and the command lines over it (launch/export.py, generate.py, ood.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from conftest import REPO, TINY, run_train
from torch.overrides import TorchFunctionMode

import ssl_ebm
from ssl_ebm import api

DIGITS = str(REPO / "configs" / "digits.yaml")


@pytest.fixture(scope="module")
def trained(digits_shards, tmp_path_factory):
    """A small digits model trained for 300 steps: (checkpoint dir, metrics.json, shards)."""
    out = tmp_path_factory.mktemp("api") / "run"
    run_train(["--config", DIGITS, *TINY, f"data.shards={digits_shards}", f"train.out_dir={out}",
               "train.steps=300", "train.eval_every=100", "train.log_every=100", "train.cpu_threads=1"])
    metrics = json.loads((out / "metrics.json").read_text())
    return str(out / "checkpoints" / f"best-{metrics['best_step']:06d}"), metrics, digits_shards


@pytest.fixture(scope="module")
def model(trained):
    return ssl_ebm.load(trained[0], allow_pickle=True)


def raw_digits(shards: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The examples of a split as the source holds them (pixel counts 0..16), with their labels."""
    from sklearn.datasets import load_digits

    manifest = json.loads((Path(shards) / "manifest.json").read_text())
    d = load_digits()
    idx = manifest["split_indices"][split]
    return d.data[idx], d.target[idx]


def cli(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


# ----------------------------------------------------------------------------- loading and safety


def test_a_checkpoint_is_refused_without_the_flag(trained):
    with pytest.raises(api.PickleRefused, match="allow_pickle=True"):
        ssl_ebm.load(trained[0])


def test_a_malicious_pickle_is_never_opened(tmp_path):
    """A checkpoint-shaped folder whose model.pt would run code when unpickled: load refuses before reading it."""
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    fs = fsspec.filesystem("memory")
    fs.pipe("/evil/best-000001/model.pt", pickle.dumps(Payload()))
    fs.pipe("/evil/best-000001/COMPLETE", b"")
    with pytest.raises(api.PickleRefused):
        ssl_ebm.load("memory://evil/best-000001")
    assert not marker.exists()
    fs.rm("/evil", recursive=True)


def test_export_to_memory_loads_without_unpickling(model, trained, monkeypatch):
    url = api.export(model, "memory://exported/digits")
    fs = fsspec.filesystem("memory")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/exported/digits", detail=False)) == \
        ["config.yaml", "manifest.json", "model.safetensors"]

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load called while loading an exported folder")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr("pickle.loads", no_unpickling)
    again = ssl_ebm.load(url)
    x, _ = raw_digits(trained[2], "test")
    torch.testing.assert_close(again.predict_proba(x), model.predict_proba(x), rtol=0, atol=0)
    for k, v in model.net.state_dict().items():
        assert torch.equal(v, again.net.state_dict()[k]), k
    assert again.manifest["normalisation"] == model.manifest["normalisation"]  # no need for the shards
    fs.rm("/exported", recursive=True)


def test_export_cli_and_bad_urls(trained, tmp_path):
    out = tmp_path / "exported"
    proc = cli("export.py", trained[0], str(out))
    assert proc.returncode == 2 and "--allow-pickle" in proc.stderr and not out.exists()
    proc = cli("export.py", trained[0], str(out), "--allow-pickle")
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors").is_file()
    (out / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(api.ModelError, match="not a readable safetensors"):
        ssl_ebm.load(str(out))
    with pytest.raises(api.ModelError, match="no such checkpoint"):
        ssl_ebm.load(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------- inference


def test_predict_matches_the_training_runs_test_accuracy(model, trained):
    _, metrics, shards = trained
    x, y = raw_digits(shards, "test")
    proba = model.predict_proba(x)
    assert proba.shape == (len(x), 10)
    torch.testing.assert_close(proba.sum(1), torch.ones(len(x)))
    acc = (model.predict(torch.as_tensor(x)) == torch.as_tensor(y)).float().mean().item()
    assert acc == pytest.approx(metrics["test"]["accuracy"], abs=1e-6)
    assert acc > 0.5  # 300 steps on 100 labels: well above chance (0.1)


def test_a_graph_smoothed_model_predicts_as_its_evaluation_scored_and_exports_its_graph(digits_shards, tmp_path):
    out = tmp_path / "graph"
    run_train(["--config", DIGITS, *TINY, f"data.shards={digits_shards}", f"train.out_dir={out}", "train.steps=40",
               "train.select=final", "train.cpu_threads=1", "model.graph_smoothing=0.9", "model.graph_pool=400"])
    metrics = json.loads((out / "metrics.json").read_text())
    smoothed = ssl_ebm.load(str(out / "checkpoints" / "step-000040"), allow_pickle=True)
    assert smoothed.graph is not None and len(smoothed.graph.mu_NZ) == 400 + 100  # the pool and the 100 labels
    x, y = raw_digits(digits_shards, "test")
    acc = (smoothed.predict(x) == torch.as_tensor(y)).float().mean().item()
    assert acc == pytest.approx(metrics["test"]["accuracy"], abs=1e-6)
    prior_only = (smoothed.net.predict_proba(smoothed.to_model_units(x)).argmax(1) == torch.as_tensor(y))
    assert prior_only.float().mean().item() == pytest.approx(metrics["test"]["prior_accuracy"], abs=1e-6)
    exported = api.export(smoothed, str(tmp_path / "exported"))
    assert (tmp_path / "exported" / api.GRAPH).is_file()
    torch.testing.assert_close(ssl_ebm.load(exported).predict_proba(x), smoothed.predict_proba(x), rtol=0, atol=0)
    (tmp_path / "exported" / api.GRAPH).unlink()  # never f alone in silence where the model was scored smoothed
    with pytest.raises(api.ModelError, match="graph.safetensors is missing"):
        ssl_ebm.load(exported)
    (tmp_path / "moved").mkdir()  # the manifest without its shards: the normalisation is there, the rows are not
    (tmp_path / "moved" / "manifest.json").write_text((Path(digits_shards) / "manifest.json").read_text())
    with pytest.raises(api.ModelError, match="graph smoothing .* pass shards=URL"):
        ssl_ebm.load(str(out / "checkpoints" / "step-000040"), allow_pickle=True, shards=str(tmp_path / "moved"))


def test_encode_applies_the_manifest_normalisation(model, trained):
    x, _ = raw_digits(trained[2], "test")
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (len(x), model.z_dim)
    norm = model.manifest["normalisation"]
    x_std = torch.as_tensor((x - np.asarray(norm["mean"])) / np.asarray(norm["std"]), dtype=torch.float32)
    with torch.no_grad():
        mu_ref, logvar_ref = model.net.encoder(x_std)
    torch.testing.assert_close(mu, mu_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logvar, logvar_ref, rtol=1e-4, atol=1e-5)


def test_bad_inputs_name_the_problem(model):
    with pytest.raises(api.ModelError, match=r"expected \(N, 64\)"):
        model.predict(np.zeros((3, 5)))
    with pytest.raises(api.ModelError, match="NaN"):
        model.predict(np.full((2, 64), np.nan))
    with pytest.raises(api.ModelError, match="one per sample"):
        model.sample(4, y=[0, 1])
    with pytest.raises(api.ModelError, match=r"in \[0, 10\)"):
        model.sample(2, y=10)
    with pytest.raises(api.ModelError, match="unknown class"):
        model.sample(2, y="eleven")
    with pytest.raises(api.ModelError, match=r"expected \(N, 8\)"):
        model.generate(torch.zeros(2, 3))


class DeviceTraffic(TorchFunctionMode):
    """The most rows of any tensor moved to or from a device (Tensor.to, .cpu, .cuda) while active: what a
    call holds on the model's device at once (on a CPU-only machine the moves are real calls all the same)."""

    MOVES = (torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda)

    def __init__(self):
        super().__init__()
        self.rows = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.MOVES and args[0].dim():
            self.rows = max(self.rows, args[0].shape[0])
        return func(*args, **(kwargs or {}))


def test_the_batch_size_bounds_what_a_call_holds_at_once(model, trained, monkeypatch):
    """With batch_size 7, no tensor of more than 7 rows goes to or from the device, into a net, or through the
    feature scaling (float64), for 359 inputs or 30 chains; the results are those of batch_size 1000."""
    x, _ = raw_digits(trained[2], "test")
    z = torch.randn(len(x), model.z_dim, generator=torch.Generator().manual_seed(0))
    calls = {"predict": lambda: model.predict_proba(x), "encode": lambda: model.encode(x)[0],
             "generate": lambda: model.generate(z), "score": lambda: model.score(x)["energy"],
             "sample": lambda: model.sample(30, y=3, seed=0, steps=5)}
    whole = {name: call() for name, call in calls.items()}  # batch_size 1024: one batch each

    rows = []  # the rows of every input to a net and to the feature scaling
    hooks = [net.register_forward_pre_hook(lambda _, args: rows.append(len(args[0])))
             for net in (model.net.encoder, model.net.generator, model.net.prior)]
    scale = api.features.to_model
    monkeypatch.setattr(api.features, "to_model", lambda x, norm: rows.append(len(x)) or scale(x, norm))
    monkeypatch.setattr(model, "batch_size", 7)
    try:
        for name, call in calls.items():
            rows.clear()
            with DeviceTraffic() as moved:
                out = call()
            assert moved.rows <= 7 and rows and max(rows) <= 7, (name, moved.rows, max(rows, default=0))
            if name != "sample":  # the chains' noise is drawn batch by batch (Model.sample)
                torch.testing.assert_close(out, whole[name], rtol=1e-5, atol=1e-5, msg=name)
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(model.sample(30, y=3, seed=0, steps=5), model.sample(30, y=3, seed=0, steps=5))


# ----------------------------------------------------------------------------- sampling and generation


def test_sample_is_seeded_and_conditions_on_the_class(model):
    n = 500
    z = model.sample(n, seed=0)
    assert z.shape == (n, model.z_dim) and torch.equal(z, model.sample(n, seed=0))
    assert not torch.equal(z, model.sample(n, seed=1))
    y = torch.arange(10).repeat_interleave(n // 10)
    z_y = model.sample(n, y=y, seed=0)
    with torch.no_grad():
        logits, logits_free = model.net.prior(z_y), model.net.prior(z)
    # Langevin on f_y(z) - |z|^2/2: the chains of class y end where f_y is larger, and the prior's classifier
    # names y for them far more often than for unconditional samples (measured: 0.29 against 0.08)
    assert logits.gather(1, y[:, None]).mean() > logits_free.gather(1, y[:, None]).mean() + 0.3
    hit, chance = ((lg.argmax(1) == y).float().mean().item() for lg in (logits, logits_free))
    assert hit > chance + 0.1, (hit, chance)
    assert torch.equal(model.sample(3, y="7", seed=2), model.sample(3, y=7, seed=2))


def langevin_by_hand(model, y: torch.Tensor, w: float, steps: int, seed: int) -> torch.Tensor:
    """Langevin on log p(z) + w log p(y|z) = F(z) - |z|^2/(2 sigma0^2) + w log softmax(f(z))_y, written out
    here (w = 1: the model's p(z|y), log density f_y(z) - |z|^2/(2 sigma0^2)), with the noise Model.sample
    draws: z0 ~ p0, then one N(0, I) per step, all from one CPU generator seeded with `seed`."""
    sigma0, s = model.cfg.model.sigma0, model.cfg.sampler.step_size
    gen = torch.Generator().manual_seed(seed)
    z = sigma0 * torch.randn((len(y), model.z_dim), generator=gen)
    for _ in range(steps):
        z.requires_grad_(True)
        f = model.net.prior(z)
        log_p = torch.logsumexp(f, 1) + w * torch.log_softmax(f, 1).gather(1, y[:, None]).squeeze(1)
        (grad,) = torch.autograd.grad(log_p.sum(), z)
        z = z.detach() + 0.5 * s * s * (grad - z.detach() / sigma0**2) + s * torch.randn(z.shape, generator=gen)
    return z


def test_guidance_sharpens_the_class_and_one_is_the_models_own(model):
    n, steps = 500, 50
    y = torch.arange(10).repeat_interleave(n // 10)
    z1, z4 = model.sample(n, y=y, seed=0, steps=steps), model.sample(n, y=y, seed=0, steps=steps, guidance=4.0)
    torch.testing.assert_close(z1, langevin_by_hand(model, y, 1.0, steps, seed=0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(z4, langevin_by_hand(model, y, 4.0, steps, seed=0), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        p1, p4 = (torch.softmax(model.net.prior(z), 1).gather(1, y[:, None]).mean().item() for z in (z1, z4))
    # log p(z) + w log p(y|z) with w = 4: the prior's own p(y|z) of the intended class rises
    assert p4 > p1 + 0.1, (p1, p4)
    with pytest.raises(api.ModelError, match="guidance must be > 0"):
        model.sample(2, y=1, guidance=0.0)


def test_generate_gives_the_datas_own_units(model, trained):
    x, _ = raw_digits(trained[2], "test")
    mu, _ = model.encode(x)
    recon = model.generate(mu)
    assert recon.shape == x.shape and recon.dtype == torch.float32
    # de-standardised: digits pixels are counts 0..16, and the reconstruction is much closer to each input
    # than the training mean is
    assert -2 < recon.mean() < 8 and recon.max() > 10
    err = (recon - torch.as_tensor(x, dtype=torch.float32)).abs().mean()
    base = (torch.as_tensor(model.manifest["normalisation"]["mean"]) - torch.as_tensor(x)).abs().mean()
    assert err < 0.8 * base, (err, base)


# ----------------------------------------------------------------------------- out-of-distribution scores


def test_scores_separate_digits_from_noise_and_inverted_digits(model, trained):
    x, _ = raw_digits(trained[2], "test")
    s_in = model.score(x)
    assert set(s_in) == set(api.SCORES) and all(v.shape == (len(x),) and v.isfinite().all() for v in s_in.values())
    assert torch.equal(model.score(x)["neg_elbo"], s_in["neg_elbo"])  # seeded: reproducible
    noise = np.random.default_rng(0).integers(0, 17, size=x.shape)
    s_out = model.score(noise)
    for k in ("energy", "neg_elbo"):
        assert api.auroc(s_in[k], s_out[k]) > 0.9, k
    # -F alone extrapolates: noise lands far out, where this f is large (why "energy" keeps p0's term)
    assert api.auroc(s_in["neg_F"], s_out["neg_F"]) < 0.5
    assert api.auroc([0.0, 1.0], [2.0, 3.0]) == 1.0 and api.auroc([2.0, 3.0], [0.0, 1.0]) == 0.0


# ----------------------------------------------------------------------------- command lines


def test_generate_cli_writes_csv_in_source_units_and_checks_it(trained, tmp_path):
    ckpt, _, shards = trained
    proc = cli("generate.py", ckpt, "--allow-pickle", "--per-class", "20", "--out", str(tmp_path),
               "--check-with", "logreg", "--shards", shards)
    assert proc.returncode == 0, proc.stderr
    rows = (tmp_path / "samples.csv").read_text().splitlines()
    assert len(rows) == 1 + 200 and rows[0].split(",")[:2] == ["class", "class_name"]
    values = np.array([[float(v) for v in r.split(",")[2:]] for r in rows[1:]])
    assert values.shape == (200, 64) and values.max() > 8  # pixel counts, not standardised features
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["checker_train_examples"] > 1000 and report["checker_test_accuracy"] > 0.9
    assert len(report["per_class"]) == 10 and 0.0 <= report["conditional_accuracy"] <= 1.0
    assert "assigns" in proc.stdout
    proc = cli("generate.py", ckpt, "--allow-pickle", "--per-class", "20", "--out", str(tmp_path / "w"),
               "--check-with", "logreg", "--shards", shards, "--guidance", "1", "4")
    assert proc.returncode == 0, proc.stderr
    both = json.loads((tmp_path / "w" / "check.json").read_text())["by_guidance"]
    assert [g["guidance"] for g in both] == [1.0, 4.0] and all((tmp_path / "w" / f"samples_w{w}.csv").exists()
                                                                for w in (1, 4))
    assert both[0]["conditional_accuracy"] == report["conditional_accuracy"]  # same seed, same classifier
    assert both[1]["conditional_accuracy"] > both[0]["conditional_accuracy"], both
    report = json.loads((tmp_path / "w" / "check.json").read_text())
    assert all(0 < g["spread"] < 10 for g in both) and 0 < report["test_spread"] < 10
    proc = cli("generate.py", ckpt, "--per-class", "2", "--out", str(tmp_path))
    assert proc.returncode == 2 and "--allow-pickle" in proc.stderr


def test_ood_cli_reports_auroc_for_another_dataset(trained, tmp_path):
    """Out: the digits inverted (16 - pixel), built into shards of their own as a table dataset."""
    from shards.make import build
    from sklearn.datasets import load_digits

    ckpt, _, shards = trained
    d = load_digits()
    table = tmp_path / "inverted.csv"
    header = ",".join([*(f"p{i}" for i in range(64)), "label"])
    table.write_text(header + "\n" + "\n".join(",".join([*map(str, (16 - row).astype(int)), str(t)])
                                               for row, t in zip(d.data, d.target)) + "\n")
    build("table", str(tmp_path / "inverted"), source=str(table), num_labelled=100, seed=0)
    proc = cli("ood.py", ckpt, "--allow-pickle", "--out", str(tmp_path / "inverted"), "--json", str(tmp_path / "o.json"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "o.json").read_text())
    assert report["in"] == shards and set(report["auroc"]) == set(api.SCORES)
    assert report["auroc"]["energy"] > 0.9 and report["auroc"]["neg_elbo"] > 0.9, report
    proc = cli("ood.py", ckpt, "--allow-pickle", "--out", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _untrained(x_shape, likelihood="gaussian", manifest=None, num_classes=3) -> api.Model:
    from ssl_ebm import config as C
    from ssl_ebm.model import LatentEBM

    torch.manual_seed(0)
    cfg = C.from_dict(C.Config, {"model": {"x_shape": list(x_shape), "likelihood": likelihood, "z_dim": 4,
                                           "hidden": 16, "prior_hidden": 16, "num_classes": num_classes}})
    return api.Model(LatentEBM(cfg.model).eval(), cfg, manifest or {})


def test_images_in_pixels_and_a_grid_with_one_row_per_class(tmp_path):
    from PIL import Image

    sys.path.insert(0, str(REPO / "launch"))
    import generate

    model = _untrained((1, 28, 28))
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    x = model.to_model_units(pixels)
    assert x.shape == (5, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x[:, 0], torch.as_tensor(pixels, dtype=torch.float32) / 127.5 - 1)
    with pytest.raises(api.ModelError, match=r"expected images \(N, 28, 28\)"):
        model.predict(np.zeros((2, 32, 32)))
    y = torch.arange(3).repeat_interleave(4)
    out = model.generate(model.sample(12, y=y, steps=5, seed=0))
    assert out.shape == (12, 28, 28, 1) and out.dtype == torch.uint8
    path = generate.write_samples(model, out, y, tmp_path, per_class=4, top_words=3)
    with Image.open(path) as im:
        assert im.size == (4 * 30, 3 * 30)  # 4 columns, one row per class, 1-pixel borders


def test_text_top_words_per_class(tmp_path):
    sys.path.insert(0, str(REPO / "launch"))
    import generate

    vocab = [f"w{i}" for i in range(20)]
    model = _untrained((20,), "multinomial", {"kind": "counts", "vocab": vocab, "class_names": ["a", "b", "c"]})
    y = torch.arange(3).repeat_interleave(5)
    probs = model.generate(model.sample(15, y=y, steps=5, seed=0))
    torch.testing.assert_close(probs.sum(1), torch.ones(15))  # word probabilities
    lines = generate.write_samples(model, probs, y, tmp_path, per_class=5, top_words=3).read_text().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["a", "b", "c"]
    top_a = [vocab[i] for i in probs[y == 0].mean(0).topk(3).indices.tolist()]
    assert lines[0].split(": ")[1].split() == top_a


# ----------------------------------------------------------------------------- a table's raw rows


def _bank_rows(n: int, jobs: list[str], seed: int):
    """Rows as a user's table has them: an age with empty cells, an income with an 'unknown' marker, a job (string
    categories, 'unknown' among them), a grade code with empty cells (read as floats), a label y."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    income = [("unknown" if i % 11 == 5 else round(float(v), 2)) for i, v in enumerate(rng.normal(1000, 300, n))]
    return pd.DataFrame({"age": np.where(np.arange(n) % 9 == 4, np.nan, rng.integers(20, 70, n)), "income": income,
                         "job": rng.choice(jobs, n), "grade": np.where(np.arange(n) % 7 == 2, np.nan, np.arange(n) % 3),
                         "y": np.arange(n) % 2})


def test_a_table_model_encodes_raw_rows_as_its_shards_did(tmp_path):
    """A DataFrame of raw rows (read from the test file as a user reads it: 'unknown' still text, empty cells NaN)
    becomes exactly the vectors the shard writer stored for those rows: medians and "is missing" columns, one-hot
    jobs, an unseen job in its block's "(unseen)" slot, scaling; by column name; kept through export and load."""
    import pandas as pd
    from shard_files import read_split
    from shards.make import build

    folder = tmp_path / "bank"
    folder.mkdir()
    _bank_rows(90, ["admin", "blue", "unknown"], 0).to_csv(folder / "train.csv", index=False)
    test = _bank_rows(20, ["admin", "blue", "unknown", "chef"], 1)
    test.to_csv(folder / "test.csv", index=False)
    url = str(tmp_path / "shards")
    manifest = build("table", url, str(folder), num_labelled=10, label_column="y", na_values="unknown",
                     categorical_columns="grade", progress=False)
    model = _untrained(manifest["x_shape"], manifest=manifest, num_classes=2)
    model.batch_size = 8  # raw rows are encoded a batch at a time too
    rows = pd.read_csv(folder / "test.csv")
    x_shards = read_split(url, "test")[0]
    np.testing.assert_allclose(model.to_model_units(rows).numpy(), x_shards, atol=1e-6)
    job = next(b for b in manifest["columns"]["categorical"] if b["name"] == "job")
    assert job["categories"] == ["(missing)", "admin", "blue", "(unseen)"]
    assert manifest["columns"]["categorical"][1]["categories"] == ["(missing)", "0", "1", "2", "(unseen)"]  # not "0.0"
    data = model.from_table(rows)  # data units: what the shards hold before scaling
    assert data.shape == (20, manifest["x_shape"][0]) and (rows["job"] == "chef").any()
    assert (data[:, job["start"] + 3] == (rows["job"] == "chef")).all()
    torch.testing.assert_close(model.encode(rows)[0], model.encode(data)[0])
    shuffled = rows[["y", "grade", "job", "income", "age"]]  # columns by name; the label column is ignored
    again = ssl_ebm.load(api.export(model, f"memory://table-{id(model)}"))
    torch.testing.assert_close(again.predict_proba(shuffled), model.predict_proba(rows))
    with pytest.raises(api.ModelError, match=r"x lacks the table column\(s\) \['job'\] the model was trained on"):
        model.predict(rows.drop(columns="job"))
    with pytest.raises(api.ModelError, match="x column 'income' holds 'lots', not a number"):
        model.predict(rows.assign(income=["lots"] * 20))
    with pytest.raises(api.ModelError, match="x is a DataFrame, but this model was not trained on a table"):
        _untrained((3,)).from_table(rows)
