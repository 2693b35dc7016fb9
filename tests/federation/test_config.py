import json

import pytest

from federation.compose import compose_config, config_from_json
from federation.config import (
    MedfedConfig,
    PrivacyConfig,
    config_to_json,
    flatten,
    section_from_flat,
)


def test_defaults_compose_to_typed_config():
    cfg = compose_config()
    assert isinstance(cfg, MedfedConfig)
    assert cfg.task.name == "seg2d"
    assert cfg.model.name == "unet"
    assert cfg.strategy.name == "fedavg"
    assert cfg.privacy.mode == "dp-sgd"
    assert cfg.federation.engine == "simulation"
    assert cfg.federation.names() == ["site-1", "site-2", "site-3"]


def test_cli_style_overrides_apply():
    cfg = compose_config(["federation.num_sites=5", "privacy.noise_multiplier=1.1", "rounds=3"])
    assert cfg.federation.num_sites == 5
    assert cfg.federation.names()[-1] == "site-5"
    assert cfg.privacy.noise_multiplier == pytest.approx(1.1)
    assert cfg.rounds == 3


def test_group_override_switches_privacy_off():
    cfg = compose_config(["privacy=none"])
    assert cfg.privacy.mode == "none"


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("privacy.noise_multipler=1.0", "noise_multipler"),
        ("rounds=many", "rounds"),
        ("privacy=laplace", "laplace"),
    ],
)
def test_bad_overrides_are_rejected_with_the_key(override, fragment):
    with pytest.raises(ValueError, match=fragment):
        compose_config([override])


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["federation.min_sites=4"], "min_sites"),
        (["rounds=0"], "rounds"),
        (["privacy.noise_multiplier=0"], "noise_multiplier"),
        (["federation.site_names=[a,b]"], "site_names"),
        (["task.val_fraction=1.5"], "val_fraction"),
    ],
)
def test_settings_that_cannot_run_are_rejected(overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        compose_config(overrides)


def test_json_round_trip_is_lossless():
    cfg = compose_config(["federation.site_names=[a,b,c]", "privacy.delta=1e-6"])
    again = config_from_json(config_to_json(cfg))
    assert again == cfg
    assert json.loads(config_to_json(cfg))["federation"]["site_names"] == ["a", "b", "c"]


def test_flat_sections_rebuild_typed_values():
    cfg = compose_config(["privacy.max_grad_norm=0.7"])
    flat = flatten({"privacy": {**cfg.privacy.__dict__}})
    assert flat["privacy.max_grad_norm"] == pytest.approx(0.7)
    privacy = section_from_flat(flat, "privacy", PrivacyConfig)
    assert privacy == cfg.privacy
