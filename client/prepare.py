"""Site-side preparation: the site's data policy, cache folder and aggregate quality summary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict

from federation import keys
from federation.dicom.prepare import PrepareOptions

__all__ = [
    "DATA_POLICY_FILE",
    "PREPARED_DIR",
    "DataPolicy",
    "prepare_options",
    "prepared_dir",
    "quality_reply",
]

DATA_POLICY_FILE = "data-policy.yaml"
PREPARED_DIR = "prepared"


@dataclass(frozen=True)
class DataPolicy:
    """What the site allows its data pipeline to use.

    Attributes:
        require_deidentified: Refuse any file that is not de-identified
            (PatientIdentityRemoved=YES and no PHI attribute values), naming the files.
    """

    require_deidentified: bool = False

    def save(self, state_dir: Path) -> Path:
        """Write the policy into the site's state folder."""
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / DATA_POLICY_FILE
        path.write_text(
            yaml.safe_dump({"data": {"require_deidentified": self.require_deidentified}})
        )
        return path

    @classmethod
    def load(cls, state_dir: Path) -> DataPolicy:
        """The site's data policy (the default when it has none).

        Raises:
            ValueError: The file exists but is not a valid data policy.
        """
        path = state_dir / DATA_POLICY_FILE
        if not path.exists():
            return cls()
        raw = yaml.safe_load(path.read_text()) or {}
        section = raw.get("data") if isinstance(raw, dict) else None
        value = section.get("require_deidentified") if isinstance(section, dict) else None
        if not isinstance(value, bool):
            raise ValueError(
                f"{path}: expected 'data: {{require_deidentified: true|false}}'; "
                "rewrite it with medfed site data-policy"
            )
        return cls(require_deidentified=value)


def prepared_dir(state_dir: Path) -> Path:
    """Where a site keeps its prepared-volume cache, manifest and quarantine report."""
    return state_dir / PREPARED_DIR


def prepare_options(state_dir: Path, *, progress: bool = False) -> PrepareOptions:
    """Preparation options that follow the site's data policy."""
    policy = DataPolicy.load(state_dir)
    return PrepareOptions(require_deidentified=policy.require_deidentified, progress=progress)


def quality_reply(msg: Message, context: Context, resolve: Callable[[Context], Any]) -> Message:
    """Answer the coordinator's data-quality query with the site's aggregate summary.

    The site prepares its data (or reads its warm cache) exactly as training will; a
    site that cannot answers with a refusal that carries counts only, never file names.
    """
    from client.site import load_site_dataset
    from federation.config import TaskConfig, section_from_flat
    from federation.dicom.quality import quality_summary, to_json
    from federation.errors import SiteRefusal
    from federation.logs import context_logger, setup_logging
    from federation.tasks import get_task

    setup_logging()
    flat = dict(msg.content.config_records[keys.CONFIG])
    run = str(flat.get(keys.RUN_NAME) or f"flwr-{msg.metadata.run_id}")
    name = str(context.node_config.get(keys.NODE_SITE_NAME, f"node-{context.node_id}"))
    status = ConfigRecord({keys.SITE: name, keys.REFUSED: ""})
    try:
        site = resolve(context)
        name = site.name
        status[keys.SITE] = name
        task_cfg = section_from_flat(flat, "task", TaskConfig)
        prepared = load_site_dataset(
            site, get_task(task_cfg.name), task_cfg, seed=int(str(flat.get(keys.SEED, 0)))
        )
    except SiteRefusal as err:
        context_logger(run=run, site=err.site).error("no data-quality summary: %s", err)
        status[keys.REFUSED] = str(err)
        return Message(RecordDict({keys.STATUS: status}), reply_to=msg)
    report = prepared.report
    entries = report.entries if report is not None else []
    quarantined = len(report.problems) if report is not None else 0
    summary = quality_summary(entries, quarantined=quarantined)
    context_logger(run=run, site=name).info(
        "data-quality summary: %d series, %d patients, %d quarantined files",
        summary["series"],
        summary["patients"],
        quarantined,
    )
    return Message(
        RecordDict(
            {
                keys.STATUS: status,
                keys.QUALITY: ConfigRecord({keys.QUALITY_SUMMARY: to_json(summary)}),
            }
        ),
        reply_to=msg,
    )
