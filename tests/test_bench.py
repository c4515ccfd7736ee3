"""The speed benchmark runs on CPU, and the captured sampler computes what the eager one does."""

import json
import subprocess
import sys

import torch

from conftest import REPO
from ssl_ebm.config import load_config
from ssl_ebm.langevin import langevin
from ssl_ebm.langevin_graph import CapturedLangevin
from ssl_ebm.nets import Prior


def test_captured_sampler_matches_eager_for_supplied_noise():
    cfg = load_config(None, ["model.z_dim=4", "model.prior_hidden=16", "model.num_classes=3"]).model
    torch.manual_seed(0)
    prior = Prior(cfg)
    z0, noise = torch.randn(32, 4), torch.randn(7, 32, 4)
    kw = dict(steps=7, step_size=0.3, sigma0=1.0)
    expected = langevin(prior, z0, noise=noise, **kw)
    got = CapturedLangevin(prior)(z0, noise=noise, **kw)
    assert torch.equal(got, expected)
    # With drawn noise both follow the same global RNG stream on CPU.
    torch.manual_seed(1)
    a = CapturedLangevin(prior)(z0, **kw)
    torch.manual_seed(1)
    assert torch.equal(a, langevin(prior, z0, **kw))


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
    assert out["device"] == "cpu" and out["captured_sampler"] is False
