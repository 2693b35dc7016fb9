"""Strategy set-up from the run configuration."""

from __future__ import annotations

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, Strategy

from federation import keys
from federation.config import MedfedConfig
from server.central import with_central_dp

__all__ = ["aggregate_metrics", "build_strategy"]

# Privacy figures are per site: the consortium-level figure is the worst site's.
_MAX_METRICS = frozenset({keys.EPSILON, keys.DP_STEPS, keys.SAMPLE_RATE})


def aggregate_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Sample-weighted mean of the sites' metrics; the maximum for privacy figures."""
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
    if s.name != "fedavg":
        raise ValueError(f"strategy.name={s.name!r} is unknown; available: ['fedavg'].")
    central = cfg.privacy.mode == "central"
    strategy = FedAvg(
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
    )
    return with_central_dp(strategy, cfg) if central else strategy
