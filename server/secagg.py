"""The coordinator's side of secure aggregation: one training round with Flower's SecAgg+.

In flwr 1.41 SecAgg+ exists only on the legacy API. `SecureAggregation.train`
drives Flower's `SecAggPlusWorkflow` for one round over the same grid the rest of the run
uses, with a legacy strategy that only collects what the workflow hands it: the unmasked
*sum* of the sites' quantised, example-weighted weights (FedAvg) and each site's metrics
and signed ledger entry. The coordinator never holds an individual site's weights, so it
cannot check them either: the norm and NaN checks of `SiteGuard` do not apply here.
Evaluation, tracking and checkpoints stay on the plain path (`server.loop`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    parameters_to_ndarrays,
)
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from federation import keys
from federation.config import MedfedConfig
from federation.errors import FederationError
from federation.logs import context_logger
from server.grids import MeteredGrid
from server.guard import RoundReport
from server.members import site_identities
from server.strategy import aggregate_metrics
from server.training import TrainResult

__all__ = ["SecureAggregation"]

_P = keys.SECAGG_STATUS_PREFIX


def _last_message(reason: str) -> str:
    """The site's own message from a wrapped error reason (Ray and Flower add tracebacks)."""
    text = reason.strip()
    if "Message: " in text:
        text = text.rsplit("Message: ", 1)[1]
    lines = text.strip().rstrip("'>").strip().splitlines() or [""]
    return lines[0][:300]


class _Collect(Strategy):
    """A legacy strategy that asks every node to train and keeps what SecAgg+ returns."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.results: list[tuple[ClientProxy, FitRes]] = []
        self.aggregate: Parameters | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Unused: the round loop holds the global model."""
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Every registered site trains."""
        proxies = sorted(client_manager.all().values(), key=lambda p: p.node_id)
        return [(p, FitIns(parameters, dict(self.config))) for p in proxies]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Keep the unmasked aggregate (the workflow put it in every FitRes)."""
        self.results = list(results)
        self.aggregate = results[0][1].parameters if results else None
        return self.aggregate, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Unused: evaluation runs on the plain path."""
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Unused."""
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Unused."""
        return None


@dataclass
class SecureAggregation:
    """Training rounds under Flower's SecAgg+ protocol (a `server.training.TrainingStep`).

    Args:
        cfg: The run's configuration (`federation.secagg_*` set the protocol;
            `federation.min_sites` the fewest sites whose update must be in the sum).
        run_name: Shown in log lines.
        names: Node id -> site name, as learned from replies (shared with the guard).
    """

    cfg: MedfedConfig
    run_name: str
    names: dict[int, str] = field(default_factory=dict)

    def _workflow(self) -> SecAggPlusWorkflow:
        fed = self.cfg.federation
        return SecAggPlusWorkflow(
            num_shares=1.0,  # every site holds a share of every other's keys
            reconstruction_threshold=float(fed.secagg_threshold),
            max_weight=fed.secagg_max_weight,
            clipping_range=fed.secagg_clipping_range,
            quantization_range=fed.secagg_quantization_range,
            timeout=fed.round_timeout,
        )

    def train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: MeteredGrid
    ) -> TrainResult:
        """Run one SecAgg+ training round; returns the FedAvg aggregate and metrics.

        Raises:
            FederationError: Fewer than `federation.min_sites` sites are in the sum, or
                too many dropped out for the protocol to unmask it.
        """
        started = time.perf_counter()
        flat: dict[str, Any] = {**config, keys.SERVER_ROUND: server_round}
        # Legacy FitIns configs hold scalars only: the site config travels as JSON.
        strategy = _Collect({keys.SITE_CONFIG_JSON: json.dumps(flat)})
        context = _legacy_context(server_round, arrays, strategy, grid)
        asked = {p.node_id for p in context.client_manager.all().values()}
        self._workflow()(grid, context)
        report, records = self._read_results(strategy, site_identities(grid))
        delivered = {p.node_id for p, _ in strategy.results} if strategy.aggregate else set()
        for node in sorted(asked - delivered):
            reason = grid.errors.get(node, "dropped out of the SecAgg+ protocol")
            report.failures[self.names.get(node, f"node-{node}")] = _last_message(reason)
        log = context_logger(run=self.run_name, round=server_round)
        for site, reason in sorted(report.failures.items()):
            log.warning("site %s left out of the secure sum: %s", site, reason)
        if strategy.aggregate is None or len(delivered) < self.cfg.federation.min_sites:
            failed = "; ".join(f"{s}: {r}" for s, r in sorted(report.failures.items()))
            raise FederationError(
                f"round {server_round}: only {len(delivered)} site(s) are in the secure "
                f"aggregate, federation.min_sites={self.cfg.federation.min_sites}. "
                f"Failed sites: {failed or 'none'}"
            )
        summed = parameters_to_ndarrays(strategy.aggregate)
        new = ArrayRecord(
            {
                k: Array(np.asarray(v, dtype=arrays[k].numpy().dtype))
                for k, v in zip(arrays.keys(), summed, strict=True)
            }
        )
        log.info(
            "SecAgg+: aggregate of %d site(s) unmasked in %.1f s",
            len(delivered),
            time.perf_counter() - started,
        )
        return TrainResult(new, aggregate_metrics(records, keys.NUM_EXAMPLES), report)

    def _read_results(
        self, strategy: _Collect, identities: dict[int, str]
    ) -> tuple[RoundReport, list[RecordDict]]:
        """Each delivering site's metrics, dataset and ledger entry, named by its key.

        A node whose key names another site than it declares has its masked update in
        the sum, but its claims are refused.
        """
        report = RoundReport()
        records = []
        for proxy, fitres in strategy.results:
            metrics: dict[str, Any] = dict(fitres.metrics)
            declared = str(metrics.pop(f"{_P}{keys.SITE}", f"node-{proxy.node_id}"))
            site = identities.get(proxy.node_id, declared)
            self.names[proxy.node_id] = site
            if site != declared:
                report.failures[site] = (
                    f"node {proxy.node_id} authenticated with site {site}'s key but declared "
                    f"itself {declared!r}: its metrics and ledger entry are refused"
                )
                continue
            report.datasets[site] = str(metrics.pop(f"{_P}{keys.DATASET}", ""))
            if entry := str(metrics.pop(f"{_P}{keys.LEDGER}", "")):
                report.ledger[site] = entry
            report.metrics[site] = {k: float(v) for k, v in metrics.items()}
            records.append(RecordDict({keys.METRICS: MetricRecord(metrics)}))
        return report, records


def _legacy_context(
    server_round: int, arrays: ArrayRecord, strategy: _Collect, grid: MeteredGrid
) -> LegacyContext:
    """The legacy context Flower's workflow runs in: every node a client, the model."""
    clients = SimpleClientManager()
    for node in sorted(grid.get_node_ids()):
        clients.register(GridClientProxy(node_id=node, grid=grid, run_id=grid.run.run_id))
    context = LegacyContext(
        Context(
            run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}
        ),
        config=ServerConfig(num_rounds=1),
        strategy=strategy,
        client_manager=clients,
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: server_round}
    )
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord(
        {k: Array(arrays[k].numpy()) for k in arrays.keys()}
    )
    return context
