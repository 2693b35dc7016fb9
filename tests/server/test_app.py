from federation import keys
from federation.compose import compose_config
from federation.config import config_to_json
from server.app import config_from_run_config


def test_run_config_carries_the_resolved_config_or_falls_back_to_defaults():
    cfg = compose_config(["rounds=3", "privacy=none"])
    assert config_from_run_config({keys.RUN_CONFIG_JSON: config_to_json(cfg)}) == cfg
    assert config_from_run_config({keys.RUN_CONFIG_JSON: ""}) == compose_config()
    assert config_from_run_config({}) == compose_config()
