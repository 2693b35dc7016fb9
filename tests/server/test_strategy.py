import pytest
from flwr.app import MetricRecord, RecordDict

from federation.compose import compose_config
from server.loop import RoundRecord
from server.strategy import aggregate_metrics, build_strategy


def _reply(n, loss, eps):
    return RecordDict(
        {"metrics": MetricRecord({"num-examples": n, "train-loss": loss, "epsilon": eps})}
    )


def test_metrics_are_sample_weighted_and_epsilon_is_the_worst_site():
    out = aggregate_metrics([_reply(100, 1.0, 2.0), _reply(300, 2.0, 5.0)], "num-examples")
    assert out["train-loss"] == pytest.approx((100 * 1.0 + 300 * 2.0) / 400)
    assert out["epsilon"] == pytest.approx(5.0)
    assert out["num-examples"] == 400


def test_training_span_runs_from_the_first_start_to_the_last_end():
    def timed(n, started, seconds):
        metrics = {"num-examples": n, "train-seconds": seconds, "train-started": started}
        metrics["train-finished"] = started + seconds
        return RecordDict({"metrics": MetricRecord(metrics)})

    out = aggregate_metrics([timed(10, 1000.0, 4.0), timed(30, 1001.0, 2.0)], "num-examples")
    assert out["train-seconds"] == 4.0  # the slowest site
    assert (out["train-started"], out["train-finished"]) == (1000.0, 1004.0)
    record = RoundRecord(round=1, seconds=6.0, train=dict(out), train_phase_seconds=5.0)
    assert record.overhead_share == pytest.approx(0.2)
    assert record.idle_share == pytest.approx(0.2)  # 4 s of 5 with a site training
    assert RoundRecord(round=1, seconds=1.0).idle_share is None


def test_idle_share_never_exceeds_overhead_share_from_clock_rounding():
    # At epoch times, started + seconds - started can lose ~0.2 us against seconds.
    started, seconds = 1795000000.903489, 0.5606166111869025
    assert (started + seconds) - started < seconds
    train = {"train-seconds": seconds, "train-started": started}
    train["train-finished"] = started + seconds
    record = RoundRecord(round=1, seconds=1.0, train=train, train_phase_seconds=1.0)
    assert record.overhead_share is not None and record.idle_share is not None
    assert record.idle_share <= record.overhead_share


def test_unknown_strategy_is_rejected():
    cfg = compose_config(["strategy.name=fedsgd"])
    with pytest.raises(ValueError, match="fedsgd"):
        build_strategy(cfg)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("fedavg", "FedAvg"),
        ("fedprox", "FedProx"),
        ("fedadam", "FedAdam"),
        ("fedyogi", "FedYogi"),
        ("fedmedian", "FedMedian"),
        ("krum", "Krum"),
    ],
)
def test_strategy_groups_build_flowers_strategies(name, cls):
    strategy = build_strategy(compose_config([f"strategy={name}"]))
    # Flower's own class (FedAdam/FedYogi: its resumable subclass, whose moments checkpoint).
    assert cls in {type(strategy).__name__, type(strategy).__mro__[2].__name__}
    if name == "fedprox":
        assert strategy.proximal_mu == pytest.approx(0.01)
