"""Who this site is, where its data lives, and its prepared dataset."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context

from client.prepare import prepare_options, prepared_dir
from federation import keys
from federation.config import TaskConfig
from federation.dicom.phi import DeidentificationRequired
from federation.dicom.prepare import PrepareReport, labelled_volumes
from federation.dicom.volume import Volume
from federation.errors import SiteDataError
from federation.logs import context_logger
from federation.tasks.base import Task
from federation.tasks.store import DatasetStore

__all__ = [
    "DATASETS_DIR",
    "PreparedSite",
    "SimulatedSites",
    "SiteIdentity",
    "dataset_fingerprint",
    "load_site_dataset",
    "site_from_node_config",
    "torch_threads",
]


def torch_threads(cpus_per_site: float) -> int:
    """Torch threads for a site given `federation.cpus_per_site`: its whole part, at least 1."""
    return max(1, int(cpus_per_site))


@dataclass(frozen=True)
class SiteIdentity:
    """A site's name, its own DICOM folder and its own state folder."""

    name: str
    data_path: Path
    state_dir: Path


@dataclass(frozen=True)
class PreparedSite:
    """A site's dataset ready for the task, and its fingerprint for privacy accounting."""

    data: Any
    fingerprint: str
    num_series: int
    report: PrepareReport | None = None


def site_from_node_config(context: Context) -> SiteIdentity:
    """Identity from the SuperNode's node config (`site-name`, `data-path`, `state-dir`)."""
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
    default_state = Path.home() / ".medfed" / "sites" / name
    state = Path(str(cfg.get(keys.NODE_STATE_DIR, default_state)))
    return SiteIdentity(name, Path(str(cfg[keys.NODE_DATA_PATH])), state)


@dataclass(frozen=True)
class SimulatedSites:
    """Identity of simulated nodes: partition `i` is site `names[i]`.

    Its data is `data_root/<name>` and its state `state_root/<name>`.
    """

    names: tuple[str, ...]
    data_root: str
    state_root: str

    def __call__(self, context: Context) -> SiteIdentity:
        """Map the simulated node's partition id to its site."""
        name = self.names[int(context.node_config[keys.NODE_PARTITION_ID])]
        return SiteIdentity(name, Path(self.data_root) / name, Path(self.state_root) / name)


_CACHE: dict[tuple[Any, ...], PreparedSite] = {}
# The site's stored task datasets, under its prepared-volume folder.
DATASETS_DIR = "datasets"


def dataset_fingerprint(sop_uids: list[str]) -> str:
    """Stable, non-identifying name of a dataset: a hash of its instance UIDs."""
    digest = hashlib.sha256("\n".join(sorted(sop_uids)).encode()).hexdigest()
    return f"ds-{digest[:16]}"


def load_site_dataset(
    site: SiteIdentity, task: Task, cfg: TaskConfig, *, seed: int, all_data: bool = False
) -> PreparedSite:
    """Read, check and prepare the site's DICOM for the task (cached per process).

    With `all_data`, every labelled series is held out (evaluation only, nothing trains).

    Volumes come from the data pipeline, whose content-hash cache lives in the site's
    state folder: a second run (or process) only reads what changed. The task's dataset
    is stored there too (`DatasetStore`), keyed by those series and the settings: each
    message's ClientApp loads it memory-mapped instead of preparing it again.

    Raises:
        SiteDataError: The folder is missing, holds no usable labelled series, or
            is not de-identified while the site's data policy requires it.

    """
    key = (str(site.data_path), repr(cfg), seed, all_data)
    if key in _CACHE:
        return _CACHE[key]
    volumes, report = _site_volumes(site, needs_mask=task.needs_mask)

    def prepare() -> Any:
        try:
            if all_data:
                return task.prepare_holdout(volumes, cfg)
            return task.prepare(volumes, cfg, seed=seed)
        except ValueError as err:
            raise SiteDataError(site.name, site.data_path, str(err)) from err

    # The same series, settings and code give the same dataset: prepared once, stored.
    series = [(e.key, e.label, e.class_label) for e in report.entries]
    store = DatasetStore(prepared_dir(site.state_dir) / DATASETS_DIR)
    dataset = store.load_or_prepare(
        store.key(task.name, repr(cfg), seed, all_data, series), prepare
    )
    prepared = PreparedSite(
        dataset,
        dataset_fingerprint([u for v in volumes for u in v.sop_uids]),
        len(volumes),
        report,
    )
    context_logger(site=site.name).info(
        "prepared %d series (dataset %s) for %s: %d training and %d held-out examples "
        "(%d not used)",
        len(volumes),
        prepared.fingerprint,
        task.name,
        dataset.num_train,
        dataset.num_val,
        len(report.problems),
    )
    _CACHE[key] = prepared
    return prepared


def _site_volumes(site: SiteIdentity, *, needs_mask: bool) -> tuple[list[Volume], PrepareReport]:
    """The site's usable labelled volumes through its data pipeline, and the pipeline's report.

    What is left out is logged with its reason in the site's own log (file names and UIDs
    stay there); the errors carry counts only.
    """
    log = context_logger(site=site.name)
    path = site.data_path
    if not path.exists():
        raise SiteDataError(site.name, path, "data folder does not exist")
    if not path.is_dir():
        raise SiteDataError(site.name, path, "data path is not a folder")
    try:
        volumes, report = labelled_volumes(
            path,
            prepared_dir(site.state_dir),
            options=prepare_options(site.state_dir),
            require_mask=needs_mask,
            mmap=True,  # read only if the task's dataset is not stored yet
        )
    except DeidentificationRequired as err:
        log.error("%s", err)
        raise SiteDataError(
            site.name,
            path,
            f"the site's data policy requires de-identified data and {len(err.files)} files "
            "are not (the site's log names them)",
        ) from err
    except ValueError as err:
        raise SiteDataError(site.name, path, str(err)) from err
    report.write(prepared_dir(site.state_dir))
    for problem in report.problems:
        log.warning("not used: %s: %s", problem.path, problem.reason)
    if not volumes:
        raise SiteDataError(
            site.name,
            path,
            f"no usable labelled series ({len(report.problems)} files or series not usable; "
            "the site's log lists each with its reason)",
        )
    return volumes, report
