"""Cross-site validation: every site's own model, and the global one, on every site's data.

After a run that leaves models of the sites' own (FedBN's local layers, personalised or
Ditto models), the coordinator asks each site for its model. A site shares it only if
its policy allows (`allow_model_sharing`); otherwise its row says so and nothing of the
model leaves the site. Each shared model, and the global one, is then evaluated by
every site on its held-out data: an N+1 by N matrix, kept as JSON, an MLflow table and a
heatmap, with the DP guarantee each model carries.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from federation import keys
from federation.config import MedfedConfig
from federation.logs import context_logger
from federation.tracking import RunTracker
from server.grids import MeteredGrid
from server.guard import SiteGuard

__all__ = ["CROSS_SITE_JSON", "CROSS_SITE_PNG", "GLOBAL", "CrossSiteMatrix", "cross_validate"]

CROSS_SITE_JSON = "cross_site.json"
CROSS_SITE_PNG = "cross_site.png"
GLOBAL = "global"  # the row of the global model


@dataclass
class CrossSiteMatrix:
    """Metric of each model (rows) on each site's held-out data (columns).

    Attributes:
        metric: The task's primary metric.
        sites: The evaluating sites, in order.
        scores: Model -> site -> metric; a missing site did not evaluate (see `failures`).
        privacy: Model -> the DP guarantee it carries, in words.
        refused: Site -> why its model was not shared (its row is empty).
        failures: Model -> site -> why that site gave no metric.
        shared_bytes: Site -> bytes it sent when asked for its model.
    """

    metric: str
    sites: list[str]
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    privacy: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    failures: dict[str, dict[str, str]] = field(default_factory=dict)
    shared_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        """Rows: the global model, then each site's."""
        return [GLOBAL, *self.sites]

    def rows(self) -> list[dict[str, Any]]:
        """One row per model: its metric at each site, its guarantee, or why it is absent."""
        out = []
        for model in self.models:
            scores = self.scores.get(model, {})
            out.append(
                {
                    "model": model if model == GLOBAL else f"{model}'s",
                    **{site: scores.get(site) for site in self.sites},
                    "privacy": self.privacy.get(model, ""),
                    "refused": self.refused.get(model, ""),
                }
            )
        return out

    def save(self, path: Path) -> Path:
        """Write the matrix as JSON."""
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, path: Path) -> CrossSiteMatrix:
        """Read a matrix written by `save`."""
        return cls(**json.loads(path.read_text()))

    def format(self) -> str:
        """The matrix as text: a row per model, a column per site's data."""
        head = ["model", *self.sites, "privacy"]
        cells = []
        for row in self.rows():
            scores = ["-" if row[s] is None else f"{row[s]:.3f}" for s in self.sites]
            note = f"refused: {row['refused']}" if row["refused"] else row["privacy"]
            cells.append([row["model"], *scores, note])
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head[:-1])]
        lines = [f"Cross-site validation, held-out {self.metric} (rows: models; columns: data):"]
        for line in [head, *cells]:
            padded = [c.ljust(w) for c, w in zip(line, widths, strict=False)]
            lines.append("  ".join([*padded, line[-1]]))
        return "\n".join(lines)

    def plot(self, path: Path) -> Path:
        """A heatmap: rows are models, columns the sites evaluating them."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        grid = np.array(
            [[self.scores.get(m, {}).get(s, np.nan) for s in self.sites] for m in self.models]
        )
        fig, ax = plt.subplots(figsize=(1.6 * len(self.sites) + 3, 0.7 * len(self.models) + 1.5))
        image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0, vmax=1)
        for i, model in enumerate(self.models):
            for j in range(len(self.sites)):
                if model in self.refused:
                    text = "refused"
                elif np.isnan(grid[i, j]):
                    text = "-"
                else:
                    text = f"{grid[i, j]:.3f}"
                ax.text(j, i, text, ha="center", va="center", color="w", fontsize=9)
        ax.set_xticks(range(len(self.sites)), [f"{s} data" for s in self.sites])
        ax.set_yticks(
            range(len(self.models)), [m if m == GLOBAL else f"{m}'s model" for m in self.models]
        )
        ax.set_title(f"Cross-site validation: held-out {self.metric}")
        fig.colorbar(image, ax=ax, fraction=0.04)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def cross_validate(
    grid: MeteredGrid,
    guard: SiteGuard,
    cfg: MedfedConfig,
    *,
    arrays: ArrayRecord,
    config: ConfigRecord,
    metric: str,
    run_dir: Path,
    tracker: RunTracker,
    global_privacy: str,
) -> CrossSiteMatrix:
    """Collect the sites' models and evaluate each, and the global one, at every site."""
    log = context_logger(run=str(cfg.run_name))
    server_round = cfg.rounds + 1
    nodes = sorted(grid.get_node_ids())
    base = {**dict(config), keys.SERVER_ROUND: server_round}
    matrix = CrossSiteMatrix(metric, cfg.federation.names())
    matrix.privacy[GLOBAL] = global_privacy

    def send(kind: str, action: str, content: ArrayRecord, extra: dict[str, Any]) -> Any:
        messages = [
            Message(
                RecordDict({keys.ARRAYS: content, keys.CONFIG: ConfigRecord({**base, **extra})}),
                dst_node_id=node,
                message_type=f"{kind}.{action}",
            )
            for node in nodes
        ]
        replies = list(grid.send_and_receive(messages, timeout=cfg.federation.round_timeout))
        return replies, guard.collect(server_round, messages, replies)

    grid.reset()
    replies, report = send(MessageType.QUERY, keys.SITE_MODEL, arrays, {})
    by_node = {guard.names.get(n, f"node-{n}"): b for n, b in grid.received_from.items()}
    matrix.shared_bytes = {site: by_node.get(site, 0) for site in matrix.sites}
    models: dict[str, ArrayRecord] = {}
    for reply in replies:
        site = guard.names.get(reply.metadata.src_node_id, "")
        if site in report.metrics and keys.ARRAYS in reply.content.array_records:
            models[site] = reply.content.array_records[keys.ARRAYS]
            eps = report.metrics[site].get(keys.EPSILON)
            kind = "personal" if report.metrics[site].get(keys.PERSONAL_PREFIX + "model") else "own"
            matrix.privacy[site] = (
                f"{kind} model, DP-SGD epsilon {eps:.2f} at delta "
                f"{report.metrics[site][keys.DELTA]:g} (its ledger)"
                if eps is not None
                else f"{kind} model, no DP-SGD spend recorded"
            )
    matrix.refused = dict(report.failures)
    for site, reason in sorted(matrix.refused.items()):
        log.warning("[cross-site] %s keeps its model: %s", site, reason)

    for owner, content in [(GLOBAL, arrays), *sorted(models.items())]:
        extra = {} if owner == GLOBAL else {keys.CROSS_SITE_OWNER: owner}
        _, report = send(MessageType.EVALUATE, keys.CROSS_SITE, content, extra)
        matrix.scores[owner] = {s: m[metric] for s, m in report.metrics.items() if metric in m}
        if report.failures:
            matrix.failures[owner] = dict(report.failures)
        shown = ", ".join(f"{s} {v:.3f}" for s, v in sorted(matrix.scores[owner].items()))
        log.info("[cross-site] %s model: %s %s", owner, metric, shown)

    tracker.log_table(matrix.rows(), CROSS_SITE_JSON)
    tracker.log_artifact(matrix.plot(run_dir / CROSS_SITE_PNG))
    matrix.save(run_dir / CROSS_SITE_JSON)
    log.info("%s", matrix.format())
    return matrix
