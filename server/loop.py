"""The coordinator's round loop: evaluate, train, aggregate, evaluate, track."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from federation import keys
from federation.compose import select_metric
from federation.config import MedfedConfig, flatten, resolve_path
from federation.initweights import check_fits, load_initial_weights
from federation.logs import context_logger
from federation.models import build_model, norm_state_keys, split_norm_state
from federation.tasks import get_task
from federation.tracking import RunTracker, default_tracking_uri
from server.central import COORDINATOR, CentralPrivacy
from server.checkpoint import Checkpoint, restore_strategy_state, strategy_state
from server.crosssite import cross_validate
from server.grids import MeteredGrid
from server.guard import RoundReport, SiteGuard
from server.holdout import Holdout
from server.members import site_identities
from server.secagg import SecureAggregation
from server.strategy import build_strategy
from server.training import PlainTraining, TrainingStep

__all__ = [
    "BEST_MODEL_FILE",
    "INIT_TAG",
    "RoundLoop",
    "RoundRecord",
    "RunHistory",
    "idle_share",
    "initial_arrays",
    "site_config",
]

BEST_MODEL_FILE = "best_model.pt"
INIT_TAG = "medfed.init"  # MLflow run and model-version tag: the model a run started from

# Clock readings: they make the round's idle share, not metrics of their own.
_CLOCK_READINGS = frozenset({keys.TRAIN_STARTED, keys.TRAIN_FINISHED})
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
    holdout: dict[str, float] = field(default_factory=dict)
    update_bytes: dict[str, int] = field(default_factory=dict)  # as received, per site
    train_phase_seconds: float = 0.0  # coordinator: from sending the model to aggregating
    # Training step only: seconds and serialised bytes sent to / received from the sites.
    traffic: dict[str, float] = field(default_factory=dict)

    @property
    def overhead_share(self) -> float | None:
        """Share of the training phase not spent in the slowest site's local training."""
        slowest = self.train.get(keys.TRAIN_SECONDS)
        if slowest is None or self.train_phase_seconds <= 0:
            return None
        return max(0.0, 1.0 - slowest / self.train_phase_seconds)

    @property
    def idle_share(self) -> float | None:
        """Share of the training phase in which no site was training.

        From the first site's start to the last site's end of local training, by the
        sites' clocks (meaningful where they are synchronised, as NTP keeps them).
        """
        started = self.train.get(keys.TRAIN_STARTED)
        finished = self.train.get(keys.TRAIN_FINISHED)
        if started is None or finished is None or self.train_phase_seconds <= 0:
            return None
        return idle_share(
            span=finished - started,
            slowest=self.train.get(keys.TRAIN_SECONDS, 0.0),
            phase=self.train_phase_seconds,
        )


def idle_share(*, span: float, slowest: float, phase: float) -> float:
    """Share of a training phase of `phase` s in which no site was training.

    `span` runs from the first site's start to the last site's end of training. It holds
    the slowest site's training (`slowest` s), whatever the rounding of clock readings
    (~0.2 us at epoch times), so it is never taken as shorter.
    """
    return min(1.0, max(0.0, 1.0 - max(span, slowest) / phase))


@dataclass
class RunHistory:
    """All rounds of a run, in order."""

    run_name: str
    sites: list[str]
    rounds: list[RoundRecord] = field(default_factory=list)
    datasets: dict[str, str] = field(default_factory=dict)  # site -> dataset fingerprint
    # The task's primary metric, shown in the round table and plot.
    metric: str = keys.DICE
    # What the first global model was (`model.init`, resolved); None: random weights.
    started_from: str | None = None
    # After the last round (`strategy.personalise.local_epochs`): each site's global vs
    # personalised metrics on its held-out data, and the sites that did not personalise.
    personalised: dict[str, dict[str, float]] = field(default_factory=dict)
    personalise_failures: dict[str, str] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        """Write the history as JSON."""
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunHistory:
        """Rebuild a history from `dataclasses.asdict` output."""
        rounds = [RoundRecord(**r) for r in raw["rounds"]]
        return cls(
            raw["run_name"],
            raw["sites"],
            rounds,
            raw.get("datasets", {}),
            raw.get("metric", keys.DICE),
            raw.get("started_from"),
            raw.get("personalised", {}),
            raw.get("personalise_failures", {}),
        )

    @classmethod
    def load(cls, path: Path) -> RunHistory:
        """Read a history written by `save`."""
        return cls.from_dict(json.loads(path.read_text()))


def site_config(cfg: MedfedConfig, run_name: str) -> ConfigRecord:
    """The configuration a site receives with each message."""
    tree = asdict(cfg)
    flat = flatten({name: tree[name] for name in _SITE_SECTIONS})
    flat[keys.SEED] = cfg.seed
    flat[keys.ROUNDS] = cfg.rounds
    flat[keys.CPUS_PER_SITE] = cfg.federation.cpus_per_site
    flat[keys.RUN_NAME] = run_name
    flat[keys.LOCAL_NORM] = cfg.strategy.local_norm
    flat[keys.UPDATE_ENCODING] = cfg.federation.update_encoding
    # Part of the training plan: Flower's FedProx sends its mu too (the same value), and
    # the SecAgg+ round sends this config as it is.
    if cfg.strategy.name == "fedprox":
        flat[keys.PROXIMAL_MU] = cfg.strategy.proximal_mu
    if cfg.federation.secure_aggregation != "none":
        flat[keys.SECURE_AGGREGATION] = cfg.federation.secure_aggregation
    if cfg.evaluation.all_data:
        flat[keys.ALL_DATA] = True
    if cfg.strategy.personalise.ditto_lambda > 0:
        flat[keys.DITTO_LAMBDA] = cfg.strategy.personalise.ditto_lambda
    return ConfigRecord(flat)


def _tracked(record: RoundRecord) -> dict[str, float]:
    out = {f"train/{k}": v for k, v in record.train.items() if k not in _CLOCK_READINGS}
    out.update({f"eval/{k}": v for k, v in record.evaluate.items()})
    out.update({f"holdout/{k}": v for k, v in record.holdout.items()})
    out.update({f"traffic/{k}": v for k, v in record.traffic.items()})
    for part in (record.site_train, record.site_evaluate):
        for site, metrics in part.items():
            out.update(
                {
                    f"site/{site}/{k}": v
                    for k, v in metrics.items()
                    if k != keys.NUM_EXAMPLES and k not in _CLOCK_READINGS
                }
            )
    out.update({f"site/{s}/update-bytes": float(b) for s, b in record.update_bytes.items()})
    out["sites/delivered"] = float(len(record.site_train or record.site_evaluate))
    if record.overhead_share is not None:
        out["round/train-phase-seconds"] = record.train_phase_seconds
        out["round/overhead-share"] = record.overhead_share
    if record.idle_share is not None:
        out["round/idle-share"] = record.idle_share
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
    """Keep the coordinator's copy of each site's signed ledger entries, in MLflow too.

    An entry already copied (a round repeated after a resume) is not copied twice.
    """
    ledger_dir.mkdir(parents=True, exist_ok=True)
    for site, entry in sorted(report.ledger.items()):
        path = ledger_dir / f"{site}.jsonl"
        if path.exists() and entry in path.read_text().splitlines():
            continue
        with path.open("a") as handle:
            handle.write(entry + "\n")
        if tracker is not None:
            tracker.log_artifact(path, "ledger")


def initial_arrays(cfg: MedfedConfig) -> tuple[ArrayRecord, str | None]:
    """The round-1 global model, and what it started from (`model.init`; None: random).

    Every layer is sent, or all but the norm layers under FedBN; under FedBN the norm
    layers of `model.init` are left out like the rest's.

    Raises:
        ValueError: FedBN was asked for a model without learnable norm layers, or the
            `model.init` weights do not fit the model (the layers named).
    """
    model = build_model(cfg.model, seed=cfg.seed)
    state = model.state_dict()
    norm_keys = norm_state_keys(model) if cfg.strategy.local_norm else frozenset()
    if cfg.strategy.local_norm and not norm_keys:
        raise ValueError(
            "strategy.local_norm keeps normalisation layers at the sites, but the model "
            "has none with parameters; set model.norm_affine=true."
        )
    source = None
    if cfg.model.init:
        init = load_initial_weights(
            cfg.model.init,
            tracking_uri=cfg.tracking.uri or default_tracking_uri(),
            output_dir=resolve_path(cfg.output_dir),
        )
        # A FedBN run's package holds no norm layers: those start fresh at each site.
        given = {k: v for k, v in init.state.items() if k not in norm_keys}
        expected = split_norm_state(state, norm_keys)[0]
        check_fits(given, expected, source=f"{cfg.model.init!r} ({init.source})")
        state = {**state, **given}
        source = init.source
    return ArrayRecord(split_norm_state(state, norm_keys)[0]), source


def _selected(record: RoundRecord, cfg: MedfedConfig) -> float | None:
    """The round's value of the metric that picks the best model."""
    source = record.holdout if cfg.evaluation.holdout else record.evaluate
    value = source.get(select_metric(cfg))
    return None if value is None or not math.isfinite(value) else value


class RoundLoop:
    """The federated rounds of one run over the sites reachable through `grid`.

    After each round the state is checkpointed to `run_dir` and the best model so far
    is kept as `run_dir/best_model.pt`; with `resume_from`, rounds continue after the
    checkpoint's. Training goes through `PlainTraining` or, with
    `federation.secure_aggregation`, `SecureAggregation` (only the masked sum reaches
    the coordinator); evaluation always goes through the guard.
    """

    def __init__(
        self,
        grid: Grid,
        cfg: MedfedConfig,
        *,
        run_name: str,
        run_dir: Path,
        coordinator_dir: Path,
        tracker: RunTracker,
        resume_from: Checkpoint | None = None,
    ) -> None:
        self.grid = MeteredGrid(grid)
        self.cfg, self.run_name, self.run_dir, self.tracker = cfg, run_name, run_dir, tracker
        self.log = context_logger(run=run_name)
        self.metric = get_task(cfg.task.name).primary_metric
        self.config = site_config(cfg, run_name)
        self.guard = SiteGuard(
            build_strategy(cfg),
            min_sites=cfg.federation.min_sites,
            run_name=run_name,
            max_update_norm_ratio=cfg.strategy.max_update_norm_ratio,
            update_encoding=cfg.federation.update_encoding,
            identities=site_identities(self.grid),
        )
        self.guard.summary()
        self.training: TrainingStep = (
            SecureAggregation(cfg, run_name, names=self.guard.names)
            if cfg.federation.secure_aggregation != "none"
            else PlainTraining(self.guard, cfg.federation.round_timeout)
        )
        self.central = (
            CentralPrivacy(self.guard.inner, cfg, coordinator_dir)
            if cfg.privacy.mode == "central"
            else None
        )
        self.holdout = (
            Holdout(resolve_path(cfg.evaluation.holdout), cfg) if cfg.evaluation.holdout else None
        )
        self.arrays, started_from = initial_arrays(cfg)
        self.history = RunHistory(
            run_name, cfg.federation.names(), metric=self.metric, started_from=started_from
        )
        if started_from is not None:
            tracker.set_tag(INIT_TAG, started_from)
            self.log.info("the first global model is %s", started_from)
        self.best_round, self.best_value = -1, float("-inf")
        self.first_round = 1
        if resume_from is not None:
            restore_strategy_state(self.guard, resume_from.strategy)
            self.arrays = ArrayRecord(resume_from.arrays)
            self.history = RunHistory.from_dict(resume_from.history)
            self.best_round, self.best_value = resume_from.best_round, resume_from.best_value
            self.first_round = resume_from.round + 1
            self.log.info("resuming after round %d of %d", resume_from.round, cfg.rounds)

    def run(self) -> tuple[ArrayRecord, RunHistory]:
        """Evaluate the initial model (unless resuming), then run every round.

        Returns:
            The final global weights and the round history.

        Raises:
            FederationError: Fewer than `federation.min_sites` sites delivered a round.
        """
        if self.first_round == 1:
            started = time.perf_counter()
            initial = RoundRecord(0, 0.0)
            self._evaluate(initial)
            self._finish(initial, started)
            self.log.info(
                "[round 0] initial model: %s %.4f",
                self.metric,
                initial.evaluate.get(self.metric, float("nan")),
            )
        for server_round in range(self.first_round, self.cfg.rounds + 1):
            started = time.perf_counter()
            record = RoundRecord(server_round, 0.0)
            delivered = self._train(record, started)
            self._evaluate(record)
            self._finish(record, started)
            self._log_round(record, delivered)
        self.log.info(
            "best round %d: %s %.4f", self.best_round, select_metric(self.cfg), self.best_value
        )
        personalise = self.cfg.strategy.personalise
        if personalise.local_epochs > 0 and not self.history.personalised:
            self._personalise()
        own_models = (
            self.cfg.strategy.local_norm or personalise.local_epochs or personalise.ditto_lambda
        )
        if self.cfg.evaluation.cross_site and self.cfg.rounds > 0 and own_models:
            cross_validate(
                self.grid,
                self.guard,
                self.cfg,
                arrays=self.arrays,
                config=self.config,
                metric=self.metric,
                run_dir=self.run_dir,
                tracker=self.tracker,
                global_privacy=self._global_privacy(),
            )
        return self.arrays, self.history

    def _global_privacy(self) -> str:
        """The DP guarantee of the global model, in words."""
        last = self.history.rounds[-1]
        if self.cfg.privacy.mode == "dp-sgd":
            spent = [m[keys.EPSILON] for m in last.site_train.values() if keys.EPSILON in m]
            top = f"{max(spent):.2f}" if spent else "?"
            return f"DP-SGD at each site, epsilon up to {top} at delta {self.cfg.privacy.delta:g}"
        if self.cfg.privacy.mode == "central":
            return (
                f"client-level DP, epsilon {last.train.get(keys.CENTRAL_EPSILON, float('nan')):.2f}"
            )
        return "no DP"

    def _personalise(self) -> None:
        """Each site fine-tunes the final global model into its own, which stays there.

        The step spends privacy like a round (signed into the site's ledger as round
        `rounds + 1`); the sites send back metrics only.
        """
        server_round = self.cfg.rounds + 1
        config = ConfigRecord(
            {
                **dict(self.config),
                keys.SERVER_ROUND: server_round,
                keys.PERSONALISE_EPOCHS: self.cfg.strategy.personalise.local_epochs,
            }
        )
        messages = [
            Message(
                RecordDict({keys.ARRAYS: self.arrays, keys.CONFIG: config}),
                dst_node_id=node,
                message_type=f"{MessageType.TRAIN}.{keys.PERSONALISE}",
            )
            for node in sorted(self.grid.get_node_ids())
        ]
        replies = self.grid.send_and_receive(messages, timeout=self.cfg.federation.round_timeout)
        report = self.guard.collect(server_round, messages, replies)
        self.history.personalised = report.metrics
        self.history.personalise_failures = report.failures
        _record_ledger(report, self.run_dir / "ledger", self.tracker)
        tracked = {
            f"personal/{site}/{k}": v
            for site, metrics in report.metrics.items()
            for k, v in metrics.items()
            if k.startswith((keys.PERSONAL_PREFIX, keys.GLOBAL_PREFIX)) or k == keys.EPSILON
        }
        self.tracker.log_metrics(tracked, step=server_round)
        metric = self.metric
        for site, metrics in sorted(report.metrics.items()):
            self.log.info(
                "[personalised] %s: %s %.4f (global) -> %.4f (own model, kept at the site)",
                site,
                metric,
                metrics.get(keys.GLOBAL_PREFIX + metric, float("nan")),
                metrics.get(keys.PERSONAL_PREFIX + metric, float("nan")),
            )

    def _train(self, record: RoundRecord, started: float) -> int:
        """The round's training step, its privacy record and ledger; returns sites trained."""
        if self.central is not None:
            self.central.before_round()
        self.grid.reset()
        train_started = time.perf_counter()
        result = self.training.train(record.round, self.arrays, self.config, self.grid)
        record.train_phase_seconds = time.perf_counter() - started
        record.traffic = {
            "train-seconds": time.perf_counter() - train_started,
            "train-bytes-sent": float(self.grid.sent),
            "train-bytes-received": float(self.grid.received),
        }
        report = result.report
        if result.arrays is not None:
            self.arrays = result.arrays
        record.train = _as_dict(result.metrics)
        record.site_train = report.metrics
        record.failures.update(report.failures)
        record.update_bytes = report.update_bytes
        self.history.datasets.update(report.datasets)
        if self.central is not None and result.arrays is not None:
            entry = self.central.record(
                run=self.run_name, server_round=record.round, delivered=len(report.metrics)
            )
            report.ledger[COORDINATOR] = entry.to_json()
            record.train[keys.CENTRAL_EPSILON] = entry.epsilon
        _record_ledger(report, self.run_dir / "ledger", self.tracker)
        return len(report.metrics)

    def _evaluate(self, record: RoundRecord) -> None:
        replies = self.grid.send_and_receive(
            self.guard.configure_evaluate(record.round, self.arrays, self.config, self.grid),
            timeout=self.cfg.federation.round_timeout,
        )
        record.evaluate = _as_dict(self.guard.aggregate_evaluate(record.round, replies))
        record.site_evaluate = self.guard.evaluate_report.metrics
        record.failures.update(self.guard.evaluate_report.failures)
        if self.holdout is not None:
            record.holdout = self.holdout.evaluate(self.arrays)

    def _finish(self, record: RoundRecord, started: float) -> None:
        """Record the round, keep the best model, checkpoint."""
        record.seconds = time.perf_counter() - started
        self.history.rounds.append(record)
        self.tracker.log_metrics(_tracked(record), step=record.round)
        value = _selected(record, self.cfg)
        if value is not None and value > self.best_value:
            self.best_round, self.best_value = record.round, value
            torch.save(self.arrays.to_torch_state_dict(), self.run_dir / BEST_MODEL_FILE)
        Checkpoint(
            round=record.round,
            arrays=self.arrays.to_torch_state_dict(),
            strategy=strategy_state(self.guard),
            history=asdict(self.history),
            mlflow_run_id=self.tracker.run_id,
            best_round=self.best_round,
            best_value=self.best_value,
        ).save(self.run_dir)

    def _log_round(self, record: RoundRecord, delivered: int) -> None:
        metric = self.metric
        holdout = record.holdout.get(metric, float("nan"))
        self.log.info(
            "[round %d/%d] %d sites trained, loss %.4f, %s %.4f%s, max epsilon %s (%.1f s)",
            record.round,
            self.cfg.rounds,
            delivered,
            record.train.get(keys.TRAIN_LOSS, float("nan")),
            metric,
            record.evaluate.get(metric, float("nan")),
            f", hold-out {metric} {holdout:.4f}" if record.holdout else "",
            _epsilon_text(record),
            record.seconds,
        )
