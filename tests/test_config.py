import json

import pytest

from morphkit.config import CONFIG_VERSION, INRConfig, MorphConfig, SmoothConfig, TrainConfig
from morphkit.errors import ConfigError, MorphkitError


def test_json_round_trip_is_exact():
    cfg = MorphConfig(inr=INRConfig(hidden=64, layers=3, n_freqs=8),
                      train=TrainConfig(epochs=3, compression=(0.1, 0.4), per_clique=True, seed=7),
                      smooth=SmoothConfig(enabled=False), samples=5)
    back = MorphConfig.from_json(cfg.to_json())
    assert back == cfg
    assert json.loads(cfg.to_json())["version"] == CONFIG_VERSION


def test_load_from_file(tmp_path):
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps({"train": {"epochs": 2}}))
    assert MorphConfig.load(p).train.epochs == 2
    with pytest.raises(ConfigError, match="does not exist"):
        MorphConfig.load(tmp_path / "missing.json")


@pytest.mark.parametrize("bad", [
    {"train": {"lr": -1}},
    {"train": {"lr": float("nan")}},
    {"train": {"compression": [0.5, 0.2]}},
    {"train": {"compression": [0.0, 1.0]}},
    {"train": {"epochs": 0}},
    {"train": {"ema": 1.0}},
    {"train": {"tensor_fraction": 0}},
    {"inr": {"hidden": 0}},
    {"inr": {"n_freqs": 40}},
    {"inr": {"resample": "nearest"}},
    {"inr": {"train_base": 1}},
    {"train": {"base_lr_scale": -0.1}},
    {"smooth": {"time_budget": -1}},
    {"samples": 0},
    {"fuse_bn": "yes"},
])
def test_bad_values_raise_config_error(bad):
    with pytest.raises(ConfigError):
        MorphConfig.from_dict(bad)


def test_unknown_keys_and_versions():
    with pytest.raises(ConfigError, match="unknown config key"):
        MorphConfig.from_dict({"trian": {}})
    with pytest.raises(ConfigError, match="unknown config key"):
        MorphConfig.from_dict({"train": {"epoch": 3}})
    with pytest.raises(ConfigError, match="not supported"):
        MorphConfig.from_dict({"version": CONFIG_VERSION + 1})
    with pytest.raises(ConfigError, match="not valid JSON"):
        MorphConfig.from_json("{nope")


def test_version_1_configs_keep_the_behaviour_they_were_trained_with():
    old = MorphConfig().to_dict()
    old["version"] = 1
    for key in ("resample", "train_base", "factor_rank"):  # fields version 1 did not have
        del old["inr"][key]
    cfg = MorphConfig.from_dict(old)
    assert cfg.inr.resample == "bilinear" and cfg.inr.train_base is False and cfg.inr.factor_rank == 0
    assert MorphConfig.from_dict({"version": 1}).inr.resample == "bilinear"
    v2 = MorphConfig().to_dict()
    v2["version"] = 2
    del v2["inr"]["factor_rank"]  # added in version 3
    cfg = MorphConfig.from_dict(v2)
    assert cfg.inr.factor_rank == 0 and cfg.inr.resample == "area" and cfg.inr.train_base is True
    now = MorphConfig.from_dict({"train": {"epochs": 2}})  # a user's partial config: today's defaults
    assert now.inr.resample == "area" and now.inr.train_base is True and now.inr.factor_rank == 16
    with pytest.raises(ConfigError, match="inr.factor_rank"):
        INRConfig(factor_rank=-1)
    v5 = MorphConfig().to_dict()
    v5["version"] = 5
    del v5["inr"]["factor_above"]  # added in version 6: older manifolds factored no convolution
    assert MorphConfig.from_dict(v5).inr.factor_above == 0 and now.inr.factor_above == 4096
    with pytest.raises(ConfigError, match="inr.factor_above"):
        INRConfig(factor_above=-1)
    assert now.train.base_jitter == 0.0  # off by default (files without the key were trained without it)
    with pytest.raises(ConfigError, match="train.base_jitter"):
        TrainConfig(base_jitter=2.5)


def test_config_error_is_value_error():
    with pytest.raises(ValueError):
        TrainConfig(lr=0)
    assert issubclass(ConfigError, MorphkitError)
