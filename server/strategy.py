"""Strategy set-up from the run configuration."""

from __future__ import annotations

from typing import Any

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedYogi,
    Krum,
    Strategy,
)

from federation import keys
from federation.config import MedfedConfig
from server.central import with_central_dp
from server.checkpoint import to_arrays, to_tensors

__all__ = ["ResumableFedAdam", "ResumableFedYogi", "aggregate_metrics", "build_strategy"]


class _ServerOptimiser:
    """The state of Flower's server optimisers (FedOpt family): the model and moments."""

    current_arrays: Any
    m_t: Any
    v_t: Any

    def state_dict(self) -> dict[str, Any]:
        """The model the optimiser steps from and its first and second moments."""
        return {
            "current_arrays": to_tensors(self.current_arrays),
            "m_t": to_tensors(self.m_t),
            "v_t": to_tensors(self.v_t),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back what `state_dict` returned."""
        self.current_arrays = to_arrays(state["current_arrays"])
        self.m_t = to_arrays(state["m_t"])
        self.v_t = to_arrays(state["v_t"])


class ResumableFedAdam(_ServerOptimiser, FedAdam):
    """Flower's FedAdam whose moments survive a coordinator restart."""


class ResumableFedYogi(_ServerOptimiser, FedYogi):
    """Flower's FedYogi whose moments survive a coordinator restart."""


_STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedbn": FedAvg,  # over the shared layers; sites keep their norm layers
    "fedprox": FedProx,
    "fedadam": ResumableFedAdam,
    "fedyogi": ResumableFedYogi,
    "fedmedian": FedMedian,
    "krum": Krum,
}

# Privacy figures are per site: the consortium-level figure is the worst site's.
# The slowest site sets the round's pace; the sites' training spans first start to last end.
_MAX_METRICS = frozenset(
    {keys.EPSILON, keys.DP_STEPS, keys.SAMPLE_RATE, keys.TRAIN_SECONDS, keys.TRAIN_FINISHED}
)
_MIN_METRICS = frozenset({keys.NOISE_MULTIPLIER, keys.TRAIN_STARTED})


def aggregate_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Sample-weighted mean of the sites' metrics; the worst site's for privacy figures."""
    metrics = [next(iter(r.metric_records.values())) for r in records]
    weights = [float(m[weight_key]) for m in metrics]  # type: ignore[arg-type]
    total = sum(weights) or 1.0
    out = MetricRecord()
    for name in metrics[0].keys():
        if name == weight_key:
            continue
        values = [float(m[name]) for m in metrics]  # type: ignore[arg-type]
        if name in _MAX_METRICS:
            out[name] = max(values)
        elif name in _MIN_METRICS:
            out[name] = min(values)
        else:
            out[name] = sum(v * w for v, w in zip(values, weights, strict=True)) / total
    out[weight_key] = int(sum(weights))
    return out


def build_strategy(cfg: MedfedConfig) -> Strategy:
    """The aggregation strategy named by `strategy.name`, wrapped for central DP.

    Raises:
        ValueError: The strategy is unknown.

    """
    s, fed = cfg.strategy, cfg.federation
    server_optimiser: dict[str, float | int] = {
        "eta": s.server_lr,
        "eta_l": cfg.task.lr,
        "beta_1": s.beta_1,
        "beta_2": s.beta_2,
        "tau": s.tau,
    }
    extra: dict[str, dict[str, float | int]] = {
        "fedprox": {"proximal_mu": s.proximal_mu},
        "fedadam": server_optimiser,
        "fedyogi": server_optimiser,
        "krum": {"num_malicious_nodes": s.num_malicious},
    }
    if s.name not in _STRATEGIES:
        raise ValueError(f"strategy.name={s.name!r} is unknown; available: {sorted(_STRATEGIES)}.")
    central = cfg.privacy.mode == "central"
    strategy = _STRATEGIES[s.name](
        fraction_train=s.fraction_train,
        fraction_evaluate=s.fraction_evaluate,
        min_train_nodes=fed.min_sites,
        min_evaluate_nodes=fed.min_sites,
        min_available_nodes=fed.min_sites,
        # Client-level DP bounds each site's influence: sites weigh the same.
        weighted_by_key=keys.UNIT_WEIGHT if central else keys.NUM_EXAMPLES,
        arrayrecord_key=keys.ARRAYS,
        configrecord_key=keys.CONFIG,
        train_metrics_aggr_fn=aggregate_metrics,
        evaluate_metrics_aggr_fn=aggregate_metrics,
        **extra.get(s.name, {}),
    )
    return with_central_dp(strategy, cfg) if central else strategy
