"""A strategy wrapper that keeps refusals, failures and malformed updates out of the aggregate.

It records which site delivered what each round and stops the run with a clear
error when fewer sites than the configured minimum delivered.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from federation import keys
from federation.compression import decode_update, payload_bytes
from federation.errors import FederationError
from federation.logs import context_logger
from server.checkpoint import restore_strategy_state, strategy_state
from server.members import reply_site
from server.validation import check_arrays, check_metrics, conform, norm_outliers, update_norm

__all__ = ["RoundReport", "SiteGuard"]


@dataclass
class RoundReport:
    """Per-site outcome of one train or evaluate step."""

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    ledger: dict[str, str] = field(default_factory=dict)  # signed entries, as JSON
    datasets: dict[str, str] = field(default_factory=dict)  # dataset fingerprints
    update_bytes: dict[str, int] = field(default_factory=dict)  # as received


class SiteGuard(Strategy):
    """Wrap a strategy: aggregate only replies from sites that delivered.

    Args:
        inner: The aggregation strategy (e.g. FedAvg).
        min_sites: Fewest sites that must deliver a training round.
        run_name: Shown in log lines.
        max_update_norm_ratio: Updates whose norm exceeds this times the median of the
            other sites' are left out.
        update_encoding: How sites encode their updates (`federation.compression`).
        identities: The registered site of each node id (deployment); replies are named
            by it, and a node that declares another name is refused.

    """

    def __init__(
        self,
        inner: Strategy,
        *,
        min_sites: int,
        run_name: str,
        max_update_norm_ratio: float = float("inf"),
        update_encoding: str = "full",
        identities: Mapping[int, str] | None = None,
    ) -> None:
        self.inner = inner
        # Deployment: each node's site from its registered key (server.members).
        self.identities = dict(identities or {})
        self.update_encoding = update_encoding
        self.min_sites = min_sites
        self.max_update_norm_ratio = max_update_norm_ratio
        self._sent = ArrayRecord()
        self._asked: dict[str, set[int]] = {"train": set(), "evaluate": set()}
        self.names: dict[int, str] = {}  # node id -> site name, learned from replies
        self.log = context_logger(run=run_name)
        self.train_report = RoundReport()
        self.evaluate_report = RoundReport()

    def state_dict(self) -> dict[str, Any]:
        """The aggregation strategy's round-to-round state (`server.checkpoint`)."""
        return {"strategy": strategy_state(self.inner)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back what `state_dict` returned."""
        restore_strategy_state(self.inner, state["strategy"])

    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        self.log.info(
            "strategy %s, minimum sites per round %d", type(self.inner).__name__, self.min_sites
        )
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to the wrapped strategy, keeping the arrays updates are checked against."""
        self._sent = arrays
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._asked["train"] = {m.metadata.dst_node_id for m in messages}
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to the wrapped strategy."""
        messages = list(self.inner.configure_evaluate(server_round, arrays, config, grid))
        self._asked["evaluate"] = {m.metadata.dst_node_id for m in messages}
        return messages

    def collect(
        self, server_round: int, messages: Iterable[Message], replies: Iterable[Message]
    ) -> RoundReport:
        """The report on replies (metrics, no update) to messages sent outside the strategy."""
        asked = {m.metadata.dst_node_id for m in messages}
        return self._triage(server_round, replies, train=False, asked=asked)[1]

    def _triage(
        self,
        server_round: int,
        replies: Iterable[Message],
        *,
        train: bool,
        asked: set[int] | None = None,
    ) -> tuple[list[Message], RoundReport]:
        """The replies to aggregate (train: with full weights), and the round's report."""
        usable: dict[str, Message] = {}
        report = RoundReport()
        norms: dict[str, float] = {}
        replies = list(replies)
        answered = {m.metadata.src_node_id for m in replies}
        if asked is None:
            asked = self._asked["train" if train else "evaluate"]
        for node in sorted(asked - answered):
            name = self.names.get(node) or self.identities.get(node, f"node-{node}")
            report.failures[name] = "no reply within federation.round_timeout"
        for msg in replies:
            site, impostor = self._site_of(msg)
            if impostor:
                report.failures[site] = impostor
                continue
            if msg.has_content() and keys.LEDGER in msg.content:
                # A released update is recorded even when it is then rejected.
                entry = msg.content.config_records[keys.LEDGER][keys.LEDGER_ENTRY]
                report.ledger[site] = str(entry)
            if train and msg.has_content() and keys.ARRAYS in msg.content.array_records:
                report.update_bytes[site] = payload_bytes(msg.content.array_records[keys.ARRAYS])
            reason, update = self._judge(msg, train=train)
            if reason:
                report.failures[site] = reason
                continue
            if update is not None:
                msg.content[keys.ARRAYS] = update  # the strategy aggregates full weights
            usable[site] = msg
            if dataset := str(msg.content.config_records[keys.STATUS].get(keys.DATASET, "")):
                report.datasets[site] = dataset
            metrics = msg.content.metric_records[keys.METRICS]
            report.metrics[site] = {k: float(v) for k, v in metrics.items()}  # type: ignore[arg-type]
            if train:
                norms[site] = update_norm(msg.content.array_records[keys.ARRAYS], self._sent)
        outliers = norm_outliers(norms, max_ratio=self.max_update_norm_ratio)
        for site, reason in outliers.items():
            report.failures[site] = f"update rejected: {reason}"
            report.metrics.pop(site)
        for site, reason in sorted(report.failures.items()):
            self.log.log(
                logging.WARNING, "[round %d] site %s left out: %s", server_round, site, reason
            )
        return [m for site, m in usable.items() if site not in outliers], report

    def _site_of(self, msg: Message) -> tuple[str, str | None]:
        """The replying site's name, and why the reply is refused for its identity.

        A crashed site's name comes from its registered key or its earlier replies.
        """
        node = msg.metadata.src_node_id
        if msg.has_content() and keys.STATUS in msg.content:
            site, impostor = reply_site(msg, self.identities)
            if impostor:
                return site, impostor
            self.names[node] = site
        return self.names.get(node) or self.identities.get(node, f"node-{node}"), None

    def _judge(self, msg: Message, *, train: bool) -> tuple[str | None, ArrayRecord | None]:
        """Why a reply cannot be used (crash, refusal, malformed content), or None.

        A usable training reply comes with its update decoded to full weights.
        """
        if msg.has_error():
            # Ray and Flower wrap the site's traceback; its last line says what broke.
            lines = (msg.error.reason or "unknown error").strip().splitlines() or [""]
            return f"site process failed: {lines[-1][-300:]}", None
        if refused := str(msg.content.config_records[keys.STATUS][keys.REFUSED]):
            return refused, None
        if keys.METRICS not in msg.content.metric_records:
            return "update rejected: no metrics", None
        if problem := check_metrics(msg.content.metric_records[keys.METRICS]):
            return f"update rejected: {problem}", None
        if not train:
            return None, None
        if keys.ARRAYS not in msg.content.array_records:
            return "update rejected: no model update", None
        try:
            update = decode_update(
                msg.content.array_records[keys.ARRAYS], self._sent, encoding=self.update_encoding
            )
        except ValueError as err:
            return f"update rejected: {err}", None
        if problem := check_arrays(update, self._sent):
            return f"update rejected: {problem}", None
        return None, update

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the delivered updates, or stop if too few sites delivered."""
        usable, self.train_report = self._triage(server_round, replies, train=True)
        if len(usable) < self.min_sites:
            failed = "; ".join(f"{s}: {r}" for s, r in sorted(self.train_report.failures.items()))
            raise FederationError(
                f"round {server_round}: only {len(usable)} site(s) delivered an update, "
                f"federation.min_sites={self.min_sites}. Failed sites: {failed or 'none replied'}"
            )
        arrays, metrics = self.inner.aggregate_train(server_round, usable)
        # The global model keeps the model's dtypes, whatever the strategy computed in.
        return (None if arrays is None else conform(arrays, self._sent)), metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate the delivered evaluation metrics."""
        usable, self.evaluate_report = self._triage(server_round, replies, train=False)
        return self.inner.aggregate_evaluate(server_round, usable) if usable else None
