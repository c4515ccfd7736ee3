"""DeepSpeed ZeRO through `accelerate launch`, 2 CPU processes: the same losses as DDP, sharded resume.

The shipped launcher configs (configs/accelerate/zero*.yaml -> configs/deepspeed/*.json) are used as they
are, except that ZeRO-3 partitions every parameter here (the tiny model's are all below DeepSpeed's
persistence threshold, which would keep them whole). The first DeepSpeed run on a machine compiles a small
op (about a minute, then cached).
"""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, run_train

from ssl_ebm import config as C
from ssl_ebm import runtime
from ssl_ebm.checkpoint import CheckpointStore

DIGITS = str(REPO / "configs" / "digits.yaml")
ACCELERATE = REPO / "configs" / "accelerate"
DEEPSPEED = REPO / "configs" / "deepspeed"
# 20 steps with a warm-up that crosses the resume point (step 10): the schedule must resume too.
COMMON = [*TINY, "train.steps=20", "train.log_every=1", "train.eval_every=10", "optim.warmup_steps=15"]


def args(shards: str, out: Path, *extra: str) -> list[str]:
    return ["--config", DIGITS, *COMMON, f"data.shards={shards}", f"train.out_dir={out}", *extra]


def zero(stage_file: str, ds_json: Path | None = None) -> list[str]:
    launcher = ["--config_file", str(ACCELERATE / stage_file)]
    return launcher + (["--deepspeed_config_file", str(ds_json)] if ds_json else [])


def records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def assert_same_losses(a: list[dict], b: list[dict], exact: bool = False) -> None:
    """Every logged term (losses, energies, learning rate) of steps 1..20 agrees (to 1e-5, or exactly).

    Gradient norms are logged only where gradients live outside the engine (not under DeepSpeed).
    """
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 21))
    for ra, rb in zip(a, b):
        assert all(k.startswith("grad_norm_") for k in set(ra) ^ set(rb)), set(ra) ^ set(rb)
        shared = sorted(set(ra) & set(rb) - {"steps_per_s"})
        assert {"loss", "F_pos", "F_neg", "lr_prior"} <= set(shared), shared
        for key in shared:
            same = ra[key] == rb[key] if exact else math.isclose(ra[key], rb[key], rel_tol=1e-5, abs_tol=1e-6)
            assert same, f"step {ra['step']} {key}: {ra[key]} vs {rb[key]}"


def final_meta(out: Path) -> dict:
    return json.loads((out / "checkpoints" / "step-000020" / "meta.json").read_text())


@pytest.fixture(scope="module")
def zero3_json(tmp_path_factory) -> Path:
    """configs/deepspeed/zero3.json with every parameter partitioned."""
    cfg = json.loads((DEEPSPEED / "zero3.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path_factory.mktemp("ds") / "zero3_all_partitioned.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def fp32_runs(digits_shards, zero3_json, tmp_path_factory) -> dict[str, Path]:
    """The same 20-step fp32 run under DDP, ZeRO-2 and ZeRO-3, 2 processes each."""
    root = tmp_path_factory.mktemp("fp32")
    outs = {name: root / name for name in ("ddp", "zero2", "zero3")}
    run_train(args(digits_shards, outs["ddp"]), nproc=2)
    run_train(args(digits_shards, outs["zero2"]), nproc=2, launcher=zero("zero2.yaml"))
    run_train(args(digits_shards, outs["zero3"]), nproc=2, launcher=zero("zero3.yaml", zero3_json))
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("name,stage", [("zero2", 2), ("zero3", 3)])
def test_zero_matches_ddp_in_fp32(fp32_runs, name, stage):
    out = fp32_runs[name]
    meta = final_meta(out)
    assert (meta["zero_stage"], meta["world_size"]) == (stage, 2), "DeepSpeed was not in charge"
    assert any((out / "checkpoints" / "step-000020" / "deepspeed").rglob("*optim_states.pt"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and len(set(metrics["rank_param_checksums"])) == 1
    assert all(math.isfinite(r["loss"]) for r in records(out))
    assert_same_losses(records(fp32_runs["ddp"]), records(out))


@pytest.mark.slow
def test_zero3_checkpoint_is_sharded_and_resumes_identically(digits_shards, zero3_json, fp32_runs, tmp_path):
    out = tmp_path / "resumed"
    launcher = zero("zero3.yaml", zero3_json)
    run_train(args(digits_shards, out, "train.steps=10"), nproc=2, launcher=launcher)
    store = CheckpointStore(str(out / "checkpoints"))
    shards = sorted(p.name for p in (out / "checkpoints" / "step-000010" / "deepspeed").rglob("*.pt"))
    assert [s for s in shards if s.startswith("zero_pp_rank_")] == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    full = store.read_torch("step-000010", "model.pt")  # gathered: usable without DeepSpeed
    ddp = CheckpointStore(str(fp32_runs["ddp"] / "checkpoints")).read_torch("step-000020", "model.pt")
    assert {k: v.shape for k, v in full.items()} == {k: v.shape for k, v in ddp.items()}

    proc = run_train(args(digits_shards, out), nproc=2, launcher=launcher)  # resume=auto
    assert "resumed from" in proc.stdout and "at step 10" in proc.stdout
    assert_same_losses(records(fp32_runs["zero3"]), records(out), exact=True)


@pytest.mark.slow
def test_zero2_bf16_autocast_trains(digits_shards, fp32_runs, tmp_path):
    out = tmp_path / "bf16"
    run_train(args(digits_shards, out, "train.steps=5", "train.mixed_precision=bf16"), nproc=2,
              launcher=zero("zero2.yaml"))
    bf16, fp32 = records(out), records(fp32_runs["zero2"])[:5]
    assert [r["step"] for r in bf16] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(v) for r in bf16 for v in r.values())
    assert any(a["loss"] != b["loss"] for a, b in zip(bf16, fp32)), "bf16 autocast changed nothing"
    state = CheckpointStore(str(out / "checkpoints")).read_torch("step-000005", "model.pt")
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point()), \
        "weights stay fp32 under bf16 autocast"


@pytest.mark.slow
def test_zero2_grad_accum_and_a_failure_inside_a_window_match_ddp(digits_shards, tmp_path):
    """train.grad_accum=2, and the chain check fails in the 2nd micro-batch of update 11 (after the 1st ran
    its backward): the watchdog goes back to step-000005 on both. The partial sums of update 11 sit in the
    ZeRO optimizer, where zero_grad does not reach; had they survived the roll-back, update 12 would differ."""
    script = REPO / "tests" / "scripts" / "train_with_micro_fault.py"
    extra = ["train.steps=16", "train.checkpoint_every=5", "train.grad_accum=2", "optim.warmup_steps=0"]
    logs = []
    for name, launcher in (("ddp", None), ("zero2", zero("zero2.yaml"))):
        out = tmp_path / name
        proc = run_train(["22", "FLING", *args(digits_shards, out, *extra)], nproc=2, launcher=launcher, script=script)
        (line,) = [line for line in proc.stdout.splitlines() if line.startswith("watchdog:")]
        assert line.startswith("watchdog: step 11: ") and "restored step-000005" in line, line
        logs.append(records(out))
    assert json.loads((tmp_path / "zero2" / "checkpoints" / "step-000016" / "meta.json").read_text())["zero_stage"] == 2
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == list(range(1, 17))
    for a, b in zip(*logs):
        for key in ("loss", "F_pos", "F_neg", "lr_prior"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-6), f"step {a['step']} {key}: {a[key]} vs {b[key]}"


# ----------------------------------------------------------------------------- config filling (no launch)


def _plugin(json_name: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(deepspeed_config=json.loads((DEEPSPEED / json_name).read_text()))


def _cfg(*overrides: str) -> C.Config:
    return C.load_config(DIGITS, list(overrides))


@pytest.mark.parametrize("json_name", sorted(p.name for p in DEEPSPEED.glob("*.json")))
def test_shipped_deepspeed_configs_are_filled_from_the_run_config(json_name):
    plugin = _plugin(json_name)
    runtime._configure_deepspeed(plugin, _cfg("optim.grad_clip=5", "train.grad_accum=2", "train.mixed_precision=bf16"))
    ds = plugin.deepspeed_config
    assert ds["train_micro_batch_size_per_gpu"] == 128 + 32
    assert (ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (2, 5.0)
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"], "fp32 weights: no DeepSpeed bf16/fp16 mode"
    autos = [k for k, v in ds.items() if v == "auto"]
    assert autos == ["train_batch_size"], "Accelerate fills train_batch_size at prepare; nothing else is left"
    plugin = _plugin(json_name)
    runtime._configure_deepspeed(plugin, _cfg())
    assert plugin.deepspeed_config["torch_autocast"]["enabled"] is False
    assert plugin.deepspeed_config["gradient_clipping"] == 0.0, "optim.grad_clip=0 means no clipping"


def test_deepspeed_weight_casting_modes_are_refused():
    plugin = _plugin("zero2.json")
    plugin.deepspeed_config["bf16"] = {"enabled": True}
    with pytest.raises(C.ConfigError, match="casts the weights.*train.mixed_precision=bf16"):
        runtime._configure_deepspeed(plugin, _cfg())


def test_explicit_deepspeed_value_that_contradicts_the_run_config_is_an_error():
    plugin = _plugin("zero2.json")
    plugin.deepspeed_config["gradient_clipping"] = 1.0
    with pytest.raises(C.ConfigError, match='gradient_clipping is 1.0 but optim.grad_clip gives 0.0; set gradient_clipping to "auto"'):
        runtime._configure_deepspeed(plugin, _cfg())


@pytest.mark.parametrize("yaml_name", sorted(p.name for p in ACCELERATE.glob("zero*.yaml")))
def test_zero_launcher_configs_point_at_existing_deepspeed_configs(yaml_name):
    import yaml

    launcher = yaml.safe_load((ACCELERATE / yaml_name).read_text())
    assert launcher["distributed_type"] == "DEEPSPEED"
    ds_file = REPO / launcher["deepspeed_config"]["deepspeed_config_file"]
    assert ds_file.exists(), ds_file
    stage = json.loads(ds_file.read_text())["zero_optimization"]["stage"]
    assert yaml_name.startswith(f"zero{stage}")
    # several machines start one torch launcher per node (the SLURM scripts), not DeepSpeed's pdsh
    assert launcher["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"


@pytest.mark.parametrize("url", ["file", "memory"])
def test_engine_files_round_trip_through_fsspec(tmp_path, url):
    import fsspec

    store = CheckpointStore(f"file://{tmp_path}/ckpt" if url == "file" else "memory://ds-roundtrip")
    local = tmp_path / "engine"
    (local / "state").mkdir(parents=True)
    (local / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"shard0")
    (local / "zero_to_fp32.py").write_text("script")
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        store.upload(str(path), "step-000001", f"deepspeed/{path.relative_to(local).as_posix()}")
    back = tmp_path / "back"
    assert store.download_tree("step-000001", "deepspeed", str(back)) == 2
    assert (back / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").read_bytes() == b"shard0"
    assert (back / "zero_to_fp32.py").read_text() == "script"
    assert store.download_tree("step-000002", "deepspeed", str(tmp_path / "none")) == 0
    if url == "memory":
        fsspec.filesystem("memory").rm("/ds-roundtrip", recursive=True)


@pytest.mark.parametrize("saved,here", [((3, 2), (0, 2)), ((0, 2), (2, 2)), ((2, 2), (3, 4)), ((2, 4), (0, 1))])
def test_zero_checkpoint_resumes_only_under_its_stage(tmp_path, saved, here):
    """(ZeRO stage, processes) of the checkpoint vs the run: another stage, or DDP against ZeRO, is one clear
    error (another process count under the same stage resumes: the test below)."""
    from ssl_ebm.checkpoint import CheckpointError
    from ssl_ebm.state import TrainingState

    store = CheckpointStore(str(tmp_path / "ckpt"))
    store.write_json("step-000010", "meta.json", {"step": 10, "world_size": saved[1], "zero_stage": saved[0]})
    store.mark_complete("step-000010")
    plugin = types.SimpleNamespace(zero_stage=here[0]) if here[0] else None
    acc = types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=plugin), num_processes=here[1],
                                process_index=0)
    with pytest.raises(CheckpointError, match="resumes only under the ZeRO stage it was saved with.*the process "
                       "count may differ.*train.resume=never"):
        TrainingState(acc, None, None, None, None, cfg=None).load(store, "step-000010")


def test_engine_files_that_cannot_be_converted_are_one_clear_error(tmp_path):
    """Resuming on another process count converts the engine files (DeepSpeed's universal checkpoint); files
    the converter cannot read are one line naming them, not the converter's traceback."""
    from ssl_ebm.checkpoint import CheckpointError
    from ssl_ebm.state import TrainingState

    store, torn = CheckpointStore(str(tmp_path / "ckpt")), tmp_path / "torn.pt"
    torn.write_bytes(b"torn")
    for file in ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                 "mp_rank_00_model_states.pt"):
        store.upload(str(torn), "step-000010", f"deepspeed/state/{file}")
    state = TrainingState(None, None, None, None, None, cfg=None)
    with pytest.raises(CheckpointError, match=r"DeepSpeed could not convert .*step-000010/deepspeed/ to its universal "
                       r"checkpoint for another process count \(.+\); resume with the process count it was saved by"):
        state._load_engine(store, "step-000010", universal=True)


def test_zero2_saved_by_two_processes_resumes_on_one(digits_shards, tmp_path):
    """ZeRO-2 written by 2 processes, resumed on 1 (DeepSpeed's universal checkpoint, converted by the run
    itself): the run goes on with the weights, Adam moments and steps, learning rates and chains it saved.
    tests/scripts/zero_state.py writes the state down whole after the save and after the resume; the one
    process keeps a bank as large as the two ranks' together, so it holds every saved chain."""
    script, dump, out = REPO / "tests" / "scripts" / "zero_state.py", tmp_path / "state", tmp_path / "run"
    dump.mkdir()
    run_train([str(dump), *args(digits_shards, out, "train.steps=3")], nproc=2, launcher=zero("zero2.yaml"),
              script=script)
    proc = run_train([str(dump), *args(digits_shards, out, "train.steps=4", "sampler.bank_size=1000")], nproc=1,
                     launcher=zero("zero2.yaml"), script=script)
    assert "resumed step-000003 saved by 2 processes on 1" in proc.stdout, proc.stdout
    assert "ZeRO-2 weights and optimizer state through DeepSpeed's universal checkpoint" in proc.stdout
    saved, resumed = (torch.load(dump / f"{event}-3.pt", weights_only=True) for event in ("saved", "resumed"))
    on_disk = CheckpointStore(str(out / "checkpoints")).read_torch("step-000003", "model.pt")
    for part in ("weights", "fp32", "exp_avg", "exp_avg_sq"):
        assert saved[part].keys() == resumed[part].keys() == on_disk.keys()
        for k in saved[part]:
            assert torch.equal(saved[part][k], resumed[part][k]), f"{part} of {k} differs after the resume"
            assert part != "weights" or torch.equal(on_disk[k], resumed[part][k]), k
    assert saved["adam_step"] == resumed["adam_step"] == [3.0, 3.0, 3.0]
    assert saved["lr"] == resumed["lr"] and max(saved["lr"]) == pytest.approx(1e-3 * 4 / 15), "warm-up, update 4"
    assert any(v.abs().sum() > 0 for v in saved["exp_avg"].values())
    chains = [torch.load(dump / f"saved-3-chains-{rank}.pt", weights_only=True) for rank in (0, 1)]
    pooled = torch.stack(chains, dim=1).reshape(-1, chains[0].shape[-1])  # chain 0 of each rank, chain 1, ...
    assert torch.equal(torch.load(dump / "resumed-3-chains-0.pt", weights_only=True), pooled)
    meta = json.loads((out / "checkpoints" / "step-000004" / "meta.json").read_text())
    assert (meta["zero_stage"], meta["world_size"]) == (2, 1)
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in records(out))


def test_channels_last_weights_stay_contiguous_under_deepspeed(tmp_path):
    """On GPU image nets are channels_last; DeepSpeed broadcasts and flattens each parameter as contiguous
    bytes, which a channels_last weight is not ("self.stride(-1) must be 1 to view Float as Byte", seen on
    an H200). Under DeepSpeed the weights stay contiguous (the batches may still be channels_last)."""
    out = tmp_path / "state.json"
    run_train([str(out)], launcher=zero("zero2.yaml"), script=REPO / "tests" / "scripts" / "channels_last_state.py")
    got = json.loads(out.read_text())
    assert got["deepspeed"] and got["conv_weights"] > 0 and got["contiguous"], got
    assert math.isfinite(got["loss"])
    # without DeepSpeed the same call keeps channels_last, as asked
    run_train([str(out)], script=REPO / "tests" / "scripts" / "channels_last_state.py")
    got = json.loads(out.read_text())
    assert not got["deepspeed"] and got["channels_last"] and not got["contiguous"], got


def test_zero2_keeps_a_weight_average_and_zero3_refuses_one_in_one_line(digits_shards, zero3_json, tmp_path):
    """Under ZeRO-2 every rank holds every weight, so the average works as under DDP: best-* holds it, the
    step checkpoints carry it. ZeRO-3 partitions the weights; asking for an average there is one line."""
    out = tmp_path / "zero2_ema"
    run_train(args(digits_shards, out, "train.steps=10", "train.ema_decay=0.9"), nproc=2, launcher=zero("zero2.yaml"))
    ckpt = out / "checkpoints"
    average = torch.load(ckpt / "step-000010" / "ema.pt", weights_only=True)
    assert average["updates"] == 10
    best = torch.load(ckpt / "best-000010" / "model.pt", weights_only=True)
    assert all(torch.equal(best[k], average["shadow"][k]) for k in best)
    proc = run_train(args(digits_shards, tmp_path / "zero3_ema", "train.ema_decay=0.9"), nproc=2,
                     launcher=zero("zero3.yaml", zero3_json), check=False)
    assert proc.returncode != 0
    assert "train.ema_decay: the weight average needs every weight on every rank" in proc.stderr
