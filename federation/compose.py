"""A run's whole configuration: composed from `conf/`, read back, checked against its task.

`federation.config` holds the typed sections, each of which checks itself; the task
plug-ins (`federation.tasks`) build on those types. What needs both, a configuration
checked across its sections and against the task it names, is here.
"""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from federation.config import MedfedConfig
from federation.tasks import get_task

__all__ = ["check_config", "compose_config", "config_from_json", "select_metric"]

SCHEMA_NAME = "medfed_schema"


def check_config(cfg: MedfedConfig) -> MedfedConfig:
    """Check every section, the sections together, and the task's own settings.

    Returns:
        The same config.

    Raises:
        ValueError: A setting is invalid (named, with what to do instead).
    """
    cfg.validate()
    task = get_task(cfg.task.name)
    task.check(cfg.task, cfg.model)
    select = cfg.evaluation.select_metric
    if select is not None and select not in task.metrics:
        raise ValueError(
            f"evaluation.select_metric={select!r} is not a metric of task "
            f"{task.name!r}; use one of {list(task.metrics)} or null for "
            f"{task.primary_metric!r}."
        )
    return cfg


def select_metric(cfg: MedfedConfig) -> str:
    """The metric that picks the best round: the configured one or the task's primary."""
    return cfg.evaluation.select_metric or get_task(cfg.task.name).primary_metric


def compose_config(overrides: list[str] | None = None) -> MedfedConfig:
    """Compose `conf/config.yaml` with Hydra overrides into a checked config.

    Args:
        overrides: Hydra overrides such as `privacy.noise_multiplier=1.1` or
            `privacy=none`.

    Raises:
        ValueError: An override names an unknown key or gives a value of the wrong
            type, or the result is invalid (see `check_config`).
    """
    from hydra import compose, initialize_config_module
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    # The typed schema underlies conf/: every field can be overridden, even one a group's
    # file leaves at its default.
    ConfigStore.instance().store(name=SCHEMA_NAME, node=MedfedConfig)
    try:
        with initialize_config_module(config_module="conf", version_base="1.3"):
            raw = compose(config_name="config", overrides=list(overrides or []))
        typed = OmegaConf.merge(OmegaConf.structured(MedfedConfig), raw)
    except (HydraException, OmegaConfBaseException) as err:
        raise ValueError(f"invalid configuration override: {err}") from err
    finally:
        GlobalHydra.instance().clear()
    cfg = OmegaConf.to_object(typed)
    assert isinstance(cfg, MedfedConfig)
    return check_config(cfg)


def config_from_json(text: str) -> MedfedConfig:
    """Rebuild and check a config serialised by `federation.config.config_to_json`."""
    typed = OmegaConf.merge(OmegaConf.structured(MedfedConfig), json.loads(text))
    cfg = OmegaConf.to_object(typed)
    assert isinstance(cfg, MedfedConfig)
    return check_config(cfg)
