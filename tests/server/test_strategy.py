import pytest
from flwr.app import MetricRecord, RecordDict

from federation.config import compose_config
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
    assert type(strategy).__name__ == cls
    if name == "fedprox":
        assert strategy.proximal_mu == pytest.approx(0.01)
