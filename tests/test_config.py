import pytest
import yaml

from volseg.config import ConfigError, Config, apply_overrides, from_dict, load_config, to_dict


def test_defaults_roundtrip():
    cfg = Config()
    assert from_dict(to_dict(cfg)) == cfg


def test_unknown_key_names_key_and_valid_ones():
    with pytest.raises(ConfigError) as e:
        from_dict({"model": {"featurs": [8, 16]}})
    msg = str(e.value)
    assert "model.featurs" in msg and "features" in msg and "Did you mean" in msg
    with pytest.raises(ConfigError, match="valid keys"):
        from_dict({"trian": {}})


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.norm=batchnorm", "none"),
        ("model.spatial_dims=4", "spatial_dims"),
        ("train.lr=-1", "train.lr"),
        ("infer.overlap=1.5", "infer.overlap"),
        ("augment.flip_prob=2", "probability"),
        ("data.patch_size=[64,64]", "spatial"),
        ("train.epochs=abc", "integer"),
        ("train.lr=nan", "finite"),
        ("train.lr=.inf", "finite"),
        ("augment.noise_std=inf", "finite"),
    ],
)
def test_bad_values_rejected(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


def test_overrides_are_typed(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"model": {"features": [8, 16, 32]}, "train": {"epochs": 3}}), encoding="utf-8")
    cfg = load_config(p, ["train.lr=1e-3", "model.deep_supervision=true", "data.spacing=[1,1,2.5]", "train.epochs=7"])
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.model.deep_supervision is True
    assert cfg.data.spacing == (1.0, 1.0, 2.5)
    assert cfg.train.epochs == 7 and cfg.model.features == (8, 16, 32)
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["train.epochs"])
    with pytest.raises(ConfigError, match="config section"):
        apply_overrides({}, ["trainer.epochs=3"])


def test_configs_folder_parses():
    from pathlib import Path

    for p in sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")):
        load_config(p)


def test_frozen():
    cfg = Config()
    with pytest.raises(Exception):
        cfg.train.epochs = 3  # type: ignore[misc]
