"""Client-level (central) DP through Flower's wrappers, accounted in a signed ledger."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from federation.ledger import read_ledger
from federation.privacy import MechanismStep, PrivacyHistory
from server.loop import RunHistory
from tests.helpers import medfed_run


def test_central_dp_runs_with_both_clippings_and_is_audited(tmp_path, consortium):
    root, _ = consortium
    state = tmp_path / "state"
    for name, clipping in (("adaptive", "adaptive-server"), ("fixed", "fixed-client")):
        proc = medfed_run(
            tmp_path,
            root,
            f"run_name={name}",
            "privacy=central",
            f"privacy.clipping={clipping}",
            f"federation.site_state_root={state}",
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "eps client-level" in proc.stdout

    ledger_path = tmp_path / "outputs" / "coordinator" / "ledger.jsonl"
    entries = read_ledger(ledger_path)
    assert [(e.run, e.round) for e in entries] == [
        ("adaptive", 1),
        ("adaptive", 2),
        ("fixed", 1),
        ("fixed", 2),
    ]
    assert all(e.site == "coordinator" and e.dataset == "client-level" for e in entries)
    # Fixed clipping at the sites, all sites delivering: exactly the configured mechanism.
    for e in entries[2:]:
        assert (e.mechanism.noise_multiplier, e.mechanism.max_grad_norm) == (1.0, 1.0)
        assert e.mechanism.sample_rate == 1.0
    # Releases compose across runs on the same consortium.
    expected = PrivacyHistory(
        [MechanismStep(e.mechanism.noise_multiplier, 1.0, 1) for e in entries]
    ).epsilon(delta=1e-5)
    assert entries[-1].epsilon == pytest.approx(expected, rel=1e-9)

    history = RunHistory.load(tmp_path / "outputs" / "fixed" / "history.json")
    assert history.rounds[2].train["central-epsilon"] == pytest.approx(entries[-1].epsilon)
    # Sites spent no example-level budget: they trained without DP-SGD.
    assert not list(state.rglob("ledger.jsonl"))

    verify = subprocess.run(
        [
            sys.executable,
            "-m",
            "medfed.cli",
            "audit",
            "verify",
            str(ledger_path),
            "--keys",
            str(ledger_path.parent),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs(
        [client.get_experiment_by_name("medfed").experiment_id],
        filter_string="attributes.run_name = 'adaptive'",
    )[0]
    steps = client.get_metric_history(run.info.run_id, "train/central-epsilon")
    assert sorted(m.step for m in steps) == [1, 2]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "ledger")] == [
        "ledger/coordinator.jsonl"
    ]
