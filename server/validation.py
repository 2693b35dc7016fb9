"""Checks a site's update must pass before it may reach the aggregate."""

from __future__ import annotations

import math
import statistics

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord

__all__ = ["check_arrays", "check_metrics", "conform", "norm_outliers", "update_norm"]


def check_metrics(metrics: MetricRecord) -> str | None:
    """Why reported metrics cannot be aggregated (non-finite values), or None."""
    bad = sorted(k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v))
    return f"non-finite metrics {bad}" if bad else None


def check_arrays(update: ArrayRecord, reference: ArrayRecord) -> str | None:
    """Why an update cannot be aggregated, or None when it can.

    It must have exactly the reference's keys, shapes and dtypes, and finite values.
    """
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        return f"wrong keys: missing {missing[:5]}, unexpected {extra[:5]}"
    for key, ref in reference.items():
        got = update[key]
        if list(got.shape) != list(ref.shape):
            return f"wrong shape for {key!r}: {list(got.shape)}, expected {list(ref.shape)}"
        if got.dtype != ref.dtype:
            return f"wrong dtype for {key!r}: {got.dtype}, expected {ref.dtype}"
        values = got.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.all(np.isfinite(values)):
            return f"non-finite values (NaN or Inf) in {key!r}"
    return None


def conform(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """`arrays` in the reference's dtypes (server optimisers compute in float64)."""
    return ArrayRecord(
        {
            k: Array(np.asarray(v.numpy(), dtype=reference[k].numpy().dtype))
            for k, v in arrays.items()
        }
    )


def update_norm(update: ArrayRecord, reference: ArrayRecord) -> float:
    """L2 norm of the update's change to the reference (floating-point arrays only)."""
    total = 0.0
    for key, ref in reference.items():
        before = ref.numpy()
        if not np.issubdtype(before.dtype, np.floating):
            continue
        diff = update[key].numpy().astype(np.float64) - before.astype(np.float64)
        total += float(np.sum(diff * diff))
    return math.sqrt(total)


def norm_outliers(norms: dict[str, float], *, max_ratio: float) -> dict[str, str]:
    """Sites whose update norm exceeds `max_ratio` x the median of the others'.

    Needs at least three updates: with two, neither can be told from the other.
    """
    if len(norms) < 3:
        return {}
    outliers = {}
    for site, norm in norms.items():
        others = statistics.median(v for s, v in norms.items() if s != site)
        if others > 0 and norm > max_ratio * others:
            outliers[site] = (
                f"update norm {norm:.4g} is {norm / others:.1f}x the median of the other "
                f"sites ({others:.4g}); strategy.max_update_norm_ratio={max_ratio:g}"
            )
    return outliers
