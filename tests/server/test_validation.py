import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord

from server.validation import check_arrays, check_metrics, conform, norm_outliers, update_norm

REF = ArrayRecord({"w": Array(np.zeros((2, 3), np.float32)), "n": Array(np.zeros(1, np.int64))})
OK_METRICS = MetricRecord({"num-examples": 4, "train-loss": 0.5})


def _rec(w, n=None):
    return ArrayRecord({"w": Array(w), "n": Array(np.zeros(1, np.int64) if n is None else n)})


def test_a_well_formed_update_passes_and_its_norm_is_the_change():
    update = _rec(np.full((2, 3), 2.0, np.float32))
    assert check_arrays(update, REF) is None and check_metrics(OK_METRICS) is None
    assert update_norm(update, REF) == pytest.approx(np.sqrt(6 * 4.0))


@pytest.mark.parametrize(
    ("update", "metrics", "fragment"),
    [
        (ArrayRecord({"w": Array(np.zeros((2, 3), np.float32))}), OK_METRICS, "missing ['n']"),
        (_rec(np.zeros((3, 2), np.float32)), OK_METRICS, "wrong shape for 'w'"),
        (_rec(np.zeros((2, 3), np.float64)), OK_METRICS, "wrong dtype for 'w'"),
        (_rec(np.full((2, 3), np.nan, np.float32)), OK_METRICS, "non-finite values"),
        (_rec(np.full((2, 3), -np.inf, np.float32)), OK_METRICS, "non-finite values"),
        (
            _rec(np.zeros((2, 3), np.float32)),
            MetricRecord({"train-loss": float("nan")}),
            "non-finite metrics ['train-loss']",
        ),
    ],
)
def test_malformed_updates_are_named(update, metrics, fragment):
    problems = [check_arrays(update, REF), check_metrics(metrics)]
    assert fragment in " ".join(p for p in problems if p)


def test_norm_outliers_need_three_updates_and_use_the_others_median():
    assert norm_outliers({"a": 1.0, "b": 100.0}, max_ratio=10) == {}
    out = norm_outliers({"a": 1.0, "b": 1.2, "c": 0.9, "d": 50.0}, max_ratio=10)
    assert list(out) == ["d"] and "50" in out["d"]
    assert norm_outliers({"a": 1.0, "b": 1.2, "c": 0.9, "d": 5.0}, max_ratio=10) == {}


def test_conform_keeps_the_reference_dtypes():
    wide = ArrayRecord(
        {"w": Array(np.ones((2, 3), np.float64)), "n": Array(np.ones(1, np.float64))}
    )
    out = conform(wide, REF)
    assert out["w"].numpy().dtype == np.float32 and out["n"].numpy().dtype == np.int64
