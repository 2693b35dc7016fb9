"""The coordinator's round loop: evaluate, train, aggregate, evaluate, track."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from federation import keys
from federation.config import MedfedConfig, flatten
from federation.logs import context_logger
from federation.models import build_model
from federation.tracking import RunTracker
from server.central import COORDINATOR, CentralPrivacy
from server.guard import RoundReport, SiteGuard
from server.strategy import build_strategy

__all__ = ["RoundRecord", "RunHistory", "run_rounds", "site_config"]

# Config sections the sites need; coordinator-only settings stay at the coordinator.
_SITE_SECTIONS = ("task", "model", "privacy")


@dataclass
class RoundRecord:
    """What happened in one round (round 0 evaluates the initial model)."""

    round: int
    seconds: float
    train: dict[str, float] = field(default_factory=dict)
    evaluate: dict[str, float] = field(default_factory=dict)
    site_train: dict[str, dict[str, float]] = field(default_factory=dict)
    site_evaluate: dict[str, dict[str, float]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


@dataclass
class RunHistory:
    """All rounds of a run, in order."""

    run_name: str
    sites: list[str]
    rounds: list[RoundRecord] = field(default_factory=list)

    def save(self, path: Path) -> None:
        """Write the history as JSON."""
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> RunHistory:
        """Read a history written by `save`."""
        raw = json.loads(path.read_text())
        return cls(raw["run_name"], raw["sites"], [RoundRecord(**r) for r in raw["rounds"]])


def site_config(cfg: MedfedConfig, run_name: str) -> ConfigRecord:
    """The configuration a site receives with each message."""
    tree = asdict(cfg)
    flat = flatten({name: tree[name] for name in _SITE_SECTIONS})
    flat[keys.SEED] = cfg.seed
    flat[keys.ROUNDS] = cfg.rounds
    flat[keys.CPUS_PER_SITE] = cfg.federation.cpus_per_site
    flat[keys.RUN_NAME] = run_name
    return ConfigRecord(flat)


def _tracked(record: RoundRecord) -> dict[str, float]:
    out = {f"train/{k}": v for k, v in record.train.items()}
    out.update({f"eval/{k}": v for k, v in record.evaluate.items()})
    for part in (record.site_train, record.site_evaluate):
        for site, metrics in part.items():
            out.update(
                {f"site/{site}/{k}": v for k, v in metrics.items() if k != keys.NUM_EXAMPLES}
            )
    out["sites/delivered"] = float(len(record.site_train or record.site_evaluate))
    return out


def _epsilon_text(record: RoundRecord) -> str:
    if keys.EPSILON in record.train:
        return f"{record.train[keys.EPSILON]:.3f}"
    if keys.CENTRAL_EPSILON in record.train:
        return f"{record.train[keys.CENTRAL_EPSILON]:.3f} (client-level)"
    return "n/a"


def _as_dict(record: MetricRecord | None) -> dict[str, float]:
    return {} if record is None else {k: float(v) for k, v in record.items()}  # type: ignore[arg-type]


def _record_ledger(report: RoundReport, ledger_dir: Path, tracker: RunTracker | None) -> None:
    """Keep the coordinator's copy of each site's signed ledger entries, in MLflow too."""
    ledger_dir.mkdir(parents=True, exist_ok=True)
    for site, entry in sorted(report.ledger.items()):
        path = ledger_dir / f"{site}.jsonl"
        with path.open("a") as handle:
            handle.write(entry + "\n")
        if tracker is not None:
            tracker.log_artifact(path, "ledger")


def run_rounds(
    grid: Grid,
    cfg: MedfedConfig,
    *,
    run_name: str,
    ledger_dir: Path,
    coordinator_dir: Path,
    tracker: RunTracker | None = None,
) -> tuple[ArrayRecord, RunHistory]:
    """Run `cfg.rounds` federated rounds over the sites reachable through `grid`.

    Returns:
        The final global weights and the round history.

    Raises:
        FederationError: Fewer than `federation.min_sites` sites delivered a round.

    """
    log = context_logger(run=run_name)
    guard = SiteGuard(
        build_strategy(cfg),
        min_sites=cfg.federation.min_sites,
        run_name=run_name,
        max_update_norm_ratio=cfg.strategy.max_update_norm_ratio,
    )
    guard.summary()
    central = (
        CentralPrivacy(guard.inner, cfg, coordinator_dir) if cfg.privacy.mode == "central" else None
    )
    arrays = ArrayRecord(build_model(cfg.model, seed=cfg.seed).state_dict())
    history = RunHistory(run_name, cfg.federation.names())
    timeout = cfg.federation.round_timeout

    def evaluate(server_round: int, record: RoundRecord) -> None:
        replies = grid.send_and_receive(
            guard.configure_evaluate(server_round, arrays, site_config(cfg, run_name), grid),
            timeout=timeout,
        )
        record.evaluate = _as_dict(guard.aggregate_evaluate(server_round, replies))
        record.site_evaluate = guard.evaluate_report.metrics
        record.failures.update(guard.evaluate_report.failures)

    def finish(record: RoundRecord, started: float) -> None:
        record.seconds = time.perf_counter() - started
        history.rounds.append(record)
        if tracker is not None:
            tracker.log_metrics(_tracked(record), step=record.round)

    started = time.perf_counter()
    initial = RoundRecord(0, 0.0)
    evaluate(0, initial)
    finish(initial, started)
    log.info("[round 0] initial model: dice %.4f", initial.evaluate.get(keys.DICE, float("nan")))

    for server_round in range(1, cfg.rounds + 1):
        started = time.perf_counter()
        record = RoundRecord(server_round, 0.0)
        if central is not None:
            central.before_round()
        replies = grid.send_and_receive(
            guard.configure_train(server_round, arrays, site_config(cfg, run_name), grid),
            timeout=timeout,
        )
        new_arrays, train_metrics = guard.aggregate_train(server_round, replies)
        report: RoundReport = guard.train_report
        if new_arrays is not None:
            arrays = new_arrays
        record.train = _as_dict(train_metrics)
        record.site_train = report.metrics
        record.failures.update(report.failures)
        if central is not None and new_arrays is not None:
            entry = central.record(
                run=run_name, server_round=server_round, delivered=len(report.metrics)
            )
            report.ledger[COORDINATOR] = entry.to_json()
            record.train[keys.CENTRAL_EPSILON] = entry.epsilon
        _record_ledger(report, ledger_dir, tracker)
        evaluate(server_round, record)
        finish(record, started)
        log.info(
            "[round %d/%d] %d sites trained, loss %.4f, dice %.4f, max epsilon %s (%.1f s)",
            server_round,
            cfg.rounds,
            len(report.metrics),
            record.train.get(keys.TRAIN_LOSS, float("nan")),
            record.evaluate.get(keys.DICE, float("nan")),
            _epsilon_text(record),
            record.seconds,
        )
    return arrays, history
