"""A round's training step: how the model reaches the sites and comes back aggregated.

`server.loop.RoundLoop` runs one of two: `PlainTraining`, where each site's update
reaches the coordinator and is checked before aggregation, or
`server.secagg.SecureAggregation`, where only the masked sum does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from server.grids import MeteredGrid
from server.guard import RoundReport, SiteGuard

__all__ = ["PlainTraining", "TrainResult", "TrainingStep"]


class TrainingStep(Protocol):
    """How a round's training reaches the sites and comes back as one aggregate."""

    def train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: MeteredGrid
    ) -> TrainResult:
        """Send the model, collect the updates, return their aggregate and the report."""
        ...


@dataclass
class TrainResult:
    """One round's training step: the new global model (None: keep the old one)."""

    arrays: ArrayRecord | None
    metrics: MetricRecord | None
    report: RoundReport


@dataclass
class PlainTraining:
    """Each site's update reaches the coordinator, which checks it (`SiteGuard`)."""

    guard: SiteGuard
    timeout: float

    def train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: MeteredGrid
    ) -> TrainResult:
        """One round over the guard's strategy."""
        replies = grid.send_and_receive(
            self.guard.configure_train(server_round, arrays, config, grid), timeout=self.timeout
        )
        new, metrics = self.guard.aggregate_train(server_round, replies)
        return TrainResult(new, metrics, self.guard.train_report)
