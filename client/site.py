"""Who this site is, where its data lives, and its prepared dataset."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from flwr.app import Context

from federation import keys
from federation.config import TaskConfig
from federation.dicom.series import load_labelled_volumes
from federation.errors import SiteDataError
from federation.logs import context_logger

__all__ = ["SimulatedSites", "SiteIdentity", "load_site_dataset", "site_from_node_config"]


@dataclass(frozen=True)
class SiteIdentity:
    """A site's name and its own DICOM folder."""

    name: str
    data_path: Path


def site_from_node_config(context: Context) -> SiteIdentity:
    """Identity from the SuperNode's node config (`site-name`, `data-path`)."""
    cfg = context.node_config
    if keys.NODE_DATA_PATH not in cfg:
        raise SiteDataError(
            str(cfg.get(keys.NODE_SITE_NAME, f"node-{context.node_id}")),
            "<unset>",
            f"the SuperNode has no node config {keys.NODE_DATA_PATH!r}; start it with "
            f"--node-config \"{keys.NODE_SITE_NAME}='NAME' "
            f"{keys.NODE_DATA_PATH}='/path/to/dicom'\"",
        )
    name = str(cfg.get(keys.NODE_SITE_NAME, f"node-{context.node_id}"))
    return SiteIdentity(name, Path(str(cfg[keys.NODE_DATA_PATH])))


@dataclass(frozen=True)
class SimulatedSites:
    """Identity of simulated nodes: partition `i` is site `names[i]` under `root`."""

    names: tuple[str, ...]
    root: str

    def __call__(self, context: Context) -> SiteIdentity:
        """Map the simulated node's partition id to its site."""
        pid = int(context.node_config[keys.NODE_PARTITION_ID])
        return SiteIdentity(self.names[pid], Path(self.root) / self.names[pid])


_CACHE: dict[tuple[Any, ...], Any] = {}


def load_site_dataset(site: SiteIdentity, task: ModuleType, cfg: TaskConfig, *, seed: int) -> Any:
    """Read, check and prepare the site's DICOM for the task (cached per process).

    Raises:
        SiteDataError: The folder is missing or holds no usable labelled series.

    """
    key = (str(site.data_path), repr(cfg), seed)
    if key in _CACHE:
        return _CACHE[key]
    log = context_logger(site=site.name)
    path = site.data_path
    if not path.exists():
        raise SiteDataError(site.name, path, "data folder does not exist")
    if not path.is_dir():
        raise SiteDataError(site.name, path, "data path is not a folder")
    volumes, problems = load_labelled_volumes(path)
    for problem in problems:
        log.warning("not used: %s: %s", problem.path, problem.reason)
    if not volumes:
        # The reasons name files and UIDs: they stay in the site's own log.
        raise SiteDataError(
            site.name,
            path,
            f"no usable labelled series ({len(problems)} files or series not usable; "
            "the site's log lists each with its reason)",
        )
    try:
        dataset = task.prepare(volumes, cfg, seed=seed)
    except ValueError as err:
        raise SiteDataError(site.name, path, str(err)) from err
    log.info(
        "prepared %d series: %d training and %d held-out slices (%d not used)",
        len(volumes),
        dataset.num_train,
        dataset.num_val,
        len(problems),
    )
    _CACHE[key] = dataset
    return dataset
