"""The config tree: strict loading, dotted overrides, clear errors."""

import pytest

from ssl_ebm.config import Config, ConfigError, dump_config, load_config, parse_overrides


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  z_dim: 8\ntrain:\n  steps: 7\n")
    cfg = load_config(str(path), ["train.steps=9", "--optim.betas=[0.9, 0.99]", "model.x_shape=[1,28,28]"])
    assert cfg.model.z_dim == 8 and cfg.train.steps == 9
    assert cfg.optim.betas == (0.9, 0.99) and cfg.model.x_shape == (1, 28, 28)
    assert isinstance(cfg.optim.lr_prior, float)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["model.encoder=wrn", "model.generator=deconv", "model.x_shape=[3,32,32]"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize("override, fragment", [
    (["train.stesp=3"], "train.stesp: unknown config key; did you mean 'train.steps'"),
    (["modle.z_dim=3"], "modle: unknown config key; did you mean 'model'"),
    (["train.steps=abc"], "train.steps: expected an integer"),
    (["train.steps=1.5"], "train.steps: expected an integer"),
    (["model.encoder=resnet"], "model.encoder: unknown value 'resnet'; valid choices: wrn, conv, mlp"),
    (["model.num_classes=1"], "model.num_classes"),
    (["sampler.step_size=-0.1"], "sampler.step_size"),
    (["model.encoder=wrn"], "model.x_shape"),
    (["train.mixed_precision=fp16"], "train.mixed_precision"),
    (["model.graph_smoothing=1"], "model.graph_smoothing: got 1.0; must be in [0, 1)"),
    (["model.pseudo_label_weight=1", "model.graph_smoothing=0"],
     "model.pseudo_label_weight: reads the graph of model.graph_smoothing, which is 0 (off)"),
    (["model.pseudo_label_weight=1", "model.graph_smoothing=0.9", "model.pseudo_label_every=0"],
     "model.pseudo_label_every: pseudo_label_start and pseudo_label_every must be >= 1"),
    (["model.latent_vat_eps=0"], "model.latent_vat_weight: latent_vat_weight must be >= 0 (0 turns the term off) and "
                                 "latent_vat_eps > 0"),
    (["model.graph_pool=5"], "model.graph_pool: got 5; must be more than model.graph_neighbours=10"),
    (["train.steps"], "section.key=value"),
    (["data.batch_unlabelled=0"], "data.batch_unlabelled: is 0, but train.method 'ebm' learns from unlabelled data"),
    (["train.method=supervised", "data.batch_labelled=0"],
     "data.batch_labelled: is 0, but train.method 'supervised' learns from labelled data only"),
])
def test_bad_values_name_the_field(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert fragment in str(e.value)


def test_either_batch_part_may_be_zero_where_the_method_does_not_need_it():
    assert load_config(None, ["data.batch_labelled=0"]).data.batch_labelled == 0  # unlabelled-only pre-training
    assert load_config(None, ["train.method=supervised", "data.batch_unlabelled=0"]).data.batch_unlabelled == 0


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_every_shipped_config_loads():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files, "no configs shipped"
    for f in files:
        assert isinstance(load_config(str(f)), Config), f


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_base_file_is_merged_under_the_config(tmp_path):
    from ssl_ebm.config import config_sources, config_text

    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "root.yaml").write_text("model:\n  z_dim: 8\n  hidden: 50\ntrain:\n  steps: 7\n")
    (tmp_path / "shared" / "mid.yaml").write_text("base: root.yaml\nmodel:\n  hidden: 60\n")
    leaf = tmp_path / "leaf.yaml"
    leaf.write_text("base: shared/mid.yaml\ntrain:\n  steps: 9\n")
    cfg = load_config(str(leaf), ["model.z_dim=4"])
    assert (cfg.model.z_dim, cfg.model.hidden, cfg.train.steps) == (4, 60, 9)
    assert config_sources(str(leaf))[1:] == [str(tmp_path / "shared" / "mid.yaml"),
                                              str(tmp_path / "shared" / "root.yaml")]
    assert "hidden: 50" in config_text(str(leaf)) and "steps: 9" in config_text(str(leaf))
    # the same through an fsspec URL
    url = f"file://{leaf}"
    assert load_config(url).model.hidden == 60


def test_bad_base_files_name_the_file(tmp_path):
    leaf = tmp_path / "leaf.yaml"
    leaf.write_text("base: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"gone.yaml', the base of .*leaf.yaml', not found; fix the base: line"):
        load_config(str(leaf))
    leaf.write_text("base: loop.yaml\n")
    (tmp_path / "loop.yaml").write_text("base: leaf.yaml\n")
    with pytest.raises(ConfigError, match="is its own base"):
        load_config(str(leaf))
    leaf.write_text("base: [1]\n")
    with pytest.raises(ConfigError, match="base must be the path of another config file"):
        load_config(str(leaf))
