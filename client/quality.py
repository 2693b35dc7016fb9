"""The site's answer to the coordinator's data-quality query: aggregate counts only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.activity import SiteActivity
from client.site import load_site_dataset
from federation import keys
from federation.config import TaskConfig, section_from_flat
from federation.dicom.quality import quality_summary, to_json
from federation.errors import SiteRefusal
from federation.logs import context_logger, setup_logging
from federation.tasks import get_task

__all__ = ["quality_reply"]


def quality_reply(msg: Message, context: Context, resolve: Callable[[Context], Any]) -> Message:
    """Answer the coordinator's data-quality query with the site's aggregate summary.

    The site prepares its data (or reads its warm cache) exactly as training will; a
    site that cannot answers with a refusal that carries counts only, never file names.
    """
    setup_logging(site=True)
    flat = dict(msg.content.config_records[keys.CONFIG])
    run = str(flat.get(keys.RUN_NAME) or f"flwr-{msg.metadata.run_id}")
    name = str(context.node_config.get(keys.NODE_SITE_NAME, f"node-{context.node_id}"))
    status = ConfigRecord({keys.SITE: name, keys.REFUSED: ""})
    site = None
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
        if site is not None:
            SiteActivity(site.state_dir).record(
                run=run, round=0, action="data-quality summary", refused=str(err)
            )
        return Message(RecordDict({keys.STATUS: status}), reply_to=msg)
    report = prepared.report
    entries = report.entries if report is not None else []
    quarantined = len(report.problems) if report is not None else 0
    summary = quality_summary(entries, quarantined=quarantined)
    SiteActivity(site.state_dir).record(run=run, round=0, action="data-quality summary")
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
