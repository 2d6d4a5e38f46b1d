import dataclasses
from pathlib import Path

import pytest
import yaml

from volseg.config import Config, ConfigError, apply_overrides, from_dict, load_config, shipped_configs, to_dict


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


SHIPPED = Path(__file__).resolve().parents[1] / "configs"


def test_default_yaml_lists_every_default_with_a_comment():
    """configs/default.yaml is the readable copy of the dataclass defaults: every key, the same
    values, one comment each. Adding or changing a default means editing this file too."""
    text = (SHIPPED / "default.yaml").read_text(encoding="utf-8")
    raw, defaults = yaml.safe_load(text), to_dict(Config())
    missing = [f"{s}.{k}: {v!r}" for s, keys in defaults.items() for k, v in keys.items() if k not in (raw.get(s) or {})]
    extra = [f"{s}.{k}" for s, keys in raw.items() for k in keys if k not in defaults.get(s, {})]
    differ = [f"{s}.{k}: {raw[s][k]!r} != default {v!r}" for s, keys in defaults.items() for k, v in keys.items()
              if k in (raw.get(s) or {}) and raw[s][k] != v]
    assert not (missing or extra or differ), f"configs/default.yaml out of date; missing {missing}, unknown {extra}, differ {differ}"
    assert load_config("default") == Config()
    uncommented = [line for line in text.splitlines() if line.startswith("  ") and "#" not in line]
    assert not uncommented, f"configs/default.yaml keys without a comment: {uncommented}"


@pytest.mark.parametrize("path", sorted(SHIPPED.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_config_says_its_purpose_and_sets_only_what_it_changes(path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# ") and len(text.splitlines()[0]) > 20, f"{path.name} must start with a comment saying what it is for"
    resolved = to_dict(load_config(path))
    if path.stem == "default":
        return
    defaults = to_dict(Config())
    same = [f"{s}.{k}" for s, keys in yaml.safe_load(text).items() for k in keys if resolved[s][k] == defaults[s][k]]
    assert not same, f"{path.name} repeats defaults (list only what the config changes): {same}"


def test_config_by_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fullres = load_config("gpu_fullres", ["train.epochs=3"])
    assert fullres == load_config("gpu_fullres.yaml", ["train.epochs=3"]) == load_config(SHIPPED / "gpu_fullres.yaml", ["train.epochs=3"])
    assert fullres.model.features == (32, 64, 128, 256, 320) and fullres.data.patch_size == (128, 128, 128)
    assert fullres.train.epochs == 3 and fullres.train.lr == Config().train.lr  # unlisted keys: the defaults
    assert set(shipped_configs()) == {p.stem for p in SHIPPED.glob("*.yaml")}
    with pytest.raises(ConfigError) as e:
        load_config("gpu_fulres")
    assert "'gpu_fulres'" in str(e.value) and "'demo'" in str(e.value) and "Did you mean 'gpu_fullres'" in str(e.value)
    with pytest.raises(ConfigError, match="neither a file nor a shipped"):
        load_config("elsewhere/gpu_fullres.yaml")  # a path is never looked up among the shipped names
    (tmp_path / "demo.yaml").write_text("train: {epochs: 7}\n", encoding="utf-8")
    assert load_config("demo.yaml").train.epochs == 7  # a file in the working directory wins
    assert load_config("demo").train.epochs == 24


def test_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3  # type: ignore[misc]
