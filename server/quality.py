"""Before training: ask every site for its aggregate data-quality summary and show them.

The sites' summaries (counts and histograms only) are shown side by side in the log,
plotted, saved as JSON and logged to MLflow, so domain shift is visible before round 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from federation import keys
from federation.config import MedfedConfig
from federation.dicom.quality import format_table, plot_summaries
from federation.logs import context_logger
from federation.tracking import RunTracker
from server.loop import site_config
from server.members import reply_site, site_identities

__all__ = ["QUALITY_JSON", "QUALITY_PNG", "collect_quality"]

QUALITY_JSON = "data_quality.json"
QUALITY_PNG = "data_quality.png"


def collect_quality(
    grid: Grid,
    cfg: MedfedConfig,
    *,
    run_name: str,
    out_dir: Path,
    tracker: RunTracker | None = None,
) -> dict[str, dict[str, Any]]:
    """Query every connected site for its summary; return them by site name.

    Sites that refuse or fail are logged and left out: training decides about them.
    """
    log = context_logger(run=run_name)
    config = site_config(cfg, run_name)
    messages = [
        Message(RecordDict({keys.CONFIG: config}), dst_node_id=nid, message_type=MessageType.QUERY)
        for nid in sorted(grid.get_node_ids())
    ]
    replies = grid.send_and_receive(messages, timeout=cfg.federation.round_timeout)
    summaries: dict[str, dict[str, Any]] = {}
    identities = site_identities(grid)
    for reply in replies:
        if reply.has_error():
            log.warning("a site sent no data-quality summary: %s", reply.error.reason)
            continue
        site, refused = reply_site(reply, identities)
        if refused:
            log.error("data-quality reply of %s: %s", site, refused)
            continue
        status = reply.content.config_records.get(keys.STATUS)
        if status is not None and status.get(keys.REFUSED):
            log.warning("site %s sent no data-quality summary: %s", site, status[keys.REFUSED])
            continue
        record = reply.content.config_records.get(keys.QUALITY)
        if record is None:
            log.warning("site %s answered the data-quality query without a summary", site)
            continue
        summaries[site] = json.loads(str(record[keys.QUALITY_SUMMARY]))
    if not summaries:
        return summaries
    log.info("data quality by site, before training:\n%s", format_table(summaries))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / QUALITY_JSON).write_text(json.dumps(summaries, indent=1, sort_keys=True))
    plot_summaries(summaries, out_dir / QUALITY_PNG)
    if tracker is not None:
        tracker.log_artifact(out_dir / QUALITY_JSON)
        tracker.log_artifact(out_dir / QUALITY_PNG)
        metrics = {}
        for site, s in summaries.items():
            metrics[f"data/{site}/series"] = float(s["series"])
            metrics[f"data/{site}/patients"] = float(s["patients"])
            metrics[f"data/{site}/quarantined-files"] = float(s["quarantined_files"])
            metrics[f"data/{site}/foreground-mean"] = float(s["foreground_mean"])
        tracker.log_metrics(metrics, step=0)
    return summaries
