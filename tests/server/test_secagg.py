"""Flower SecAgg+ in a real simulated run: the coordinator only ever holds the masked sum."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from federation.dicom.synth import generate_consortium
from federation.ledger import read_ledger
from medfed.cli import main as medfed
from server.loop import RunHistory
from tests.conftest import SEED, TINY_RUN, run_sites_module

SITES = ["site-1", "site-2", "site-3", "site-4", "drop-5"]
GOOD = SITES[:4]
CLIP, LEVELS, MAX_WEIGHT = 8.0, 4194304, 100.0


@pytest.fixture(scope="module")
def secagg_run(tmp_path_factory):
    """One SecAgg+ round over five sites with DP-SGD; drop-5 drops out mid-protocol."""
    tmp = tmp_path_factory.mktemp("secagg")
    data = tmp / "data"
    generate_consortium(
        data, site_names=SITES, patients_per_site=[2, 2, 2, 3, 2], slices=8, seed=SEED
    )
    record = tmp / "record"
    overrides = [
        "rounds=1",
        *TINY_RUN,
        f"data.root={data}",
        "run_name=secure",
        "federation.num_sites=5",
        f"federation.site_names=[{','.join(SITES)}]",
        "federation.min_sites=3",
        "federation.site_budget=50",
        "federation.secure_aggregation=secaggplus",
        f"federation.secagg_max_weight={MAX_WEIGHT}",
        f"federation.site_state_root={tmp / 'state'}",
        f"output_dir={tmp / 'outputs'}",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
    ]
    proc = run_sites_module("secagg_sites", record, overrides, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp, record


def _fedavg(updates: list[dict]) -> dict[str, np.ndarray]:
    total = sum(u["weight"] for u in updates)
    return {
        k: sum(u["released"][k].double().numpy() * u["weight"] for u in updates) / total
        for k in updates[0]["released"]
    }


def _quantisation_bound(updates: list[dict]) -> float:
    """Worst error of SecAgg+'s stochastic quantisation of the weighted sum, per weight."""
    step = 2 * CLIP / LEVELS
    ratio = sum(round(u["weight"] / MAX_WEIGHT * LEVELS) / LEVELS for u in updates)
    return len(updates) * step / ratio + 1e-7


def _assert_close(aggregate: dict, expected: dict, bound: float) -> None:
    worst = max(np.abs(aggregate[k].double().numpy() - expected[k]).max() for k in expected)
    assert worst <= bound, f"secure aggregate off by {worst}, quantisation bound {bound}"


def test_secure_aggregate_equals_fedavg_with_a_dropout_mid_protocol(secagg_run):
    tmp, record = secagg_run
    round1 = RunHistory.load(tmp / "outputs" / "secure" / "history.json").rounds[1]
    # drop-5 took part in key sharing, then dropped out before sending its masked
    # vector; the other four were unmasked from their key shares and the round completed.
    assert set(round1.site_train) == set(GOOD)
    assert "drop-5 lost its network connection" in round1.failures["drop-5"]
    assert not (record / "drop-5-r1.pt").exists()
    updates = [torch.load(record / f"{s}-r1.pt") for s in GOOD]
    final = torch.load(tmp / "outputs" / "secure" / "global_model.pt")
    _assert_close(final, _fedavg(updates), _quantisation_bound(updates))
    assert all(final[k].dtype == updates[0]["released"][k].dtype for k in final)
    # Training moved the sites apart: the comparison is not between identical inputs.
    first, second = updates[0]["released"], updates[1]["released"]
    assert any(not torch.allclose(first[k], second[k]) for k in first)
    assert round1.traffic["train-bytes-received"] > 0 and round1.traffic["train-seconds"] > 0


def test_the_coordinator_never_holds_an_unmasked_update(secagg_run):
    _, record = secagg_run
    received = [torch.load(p, weights_only=False) for p in sorted(record.glob("server-*.pt"))]
    masked = [r for r in received if r["masked"] is not None]
    assert len(masked) == len(GOOD)  # one masked vector per delivering site
    # No training reply carried weights in the clear.
    assert all(not any(len(a) for a in r["arrays"].values()) for r in received)
    sites = {}
    for site in GOOD:
        update = torch.load(record / f"{site}-r1.pt")
        sites[(update["node"], 1)] = update
    for r in masked:
        update = sites[(r["node"], r["round"])]
        flat_update = np.concatenate([v.numpy().ravel() for v in update["released"].values()])
        # What a site sends is its quantised, weighted update plus masks mod 2^32: it
        # looks uniform, and dequantising it alone says nothing about the update.
        vector = np.concatenate([v.ravel() for v in r["masked"][1:]]).astype(np.float64)
        alone = vector / LEVELS * 2 * CLIP - CLIP
        assert np.abs(alone - flat_update).mean() > 100 * _quantisation_bound([update])
        assert vector.max() > 2**31  # far outside the quantisation range [0, 2^22)
        assert abs(np.corrcoef(alone, flat_update)[0, 1]) < 0.1


def test_ledger_records_secure_aggregation_and_verifies(secagg_run, capsys):
    tmp, _ = secagg_run
    assert not (tmp / "state" / "drop-5" / "ledger.jsonl").exists()  # it spent nothing
    for site in GOOD:
        (entry,) = read_ledger(tmp / "state" / site / "ledger.jsonl")
        assert (entry.round, entry.secure_aggregation) == (1, "secaggplus")
        assert entry.epsilon > 0  # DP-SGD at the site, accounted as usual
    ledgers = [str(tmp / "state" / s / "ledger.jsonl") for s in GOOD]
    assert medfed(["audit", "verify", *ledgers, "--keys", str(tmp / "state")]) == 0
    assert capsys.readouterr().out.count("OK ") == len(GOOD)
