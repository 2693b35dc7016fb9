"""Site-owned budgets, signed ledgers and the audit, across real simulated runs."""

from __future__ import annotations

import json
import subprocess
import sys

from mlflow.tracking import MlflowClient

from client.site import SiteIdentity, load_site_dataset
from client.state import SitePolicy
from federation.config import TaskConfig
from federation.ledger import read_ledger
from federation.privacy import MechanismStep, PrivacyHistory, plan_round
from federation.tasks import seg2d
from server.loop import RunHistory
from tests.conftest import SEED
from tests.helpers import medfed_run


def _medfed(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "medfed.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _epsilon_after(rounds: int, num_train: int) -> float:
    rate, steps = plan_round(num_train, batch_size=8, epochs=1)
    return PrivacyHistory([MechanismStep(1.3, rate, steps * rounds)]).epsilon(delta=1e-5)


def test_budget_refusal_persistence_ledger_and_audit(tmp_path, consortium):
    root, _ = consortium
    state = tmp_path / "state"
    task = TaskConfig(image_size=32, batch_size=8, local_epochs=1)
    site1 = load_site_dataset(
        SiteIdentity("site-1", root / "site-1", state / "site-1"), seg2d.TASK, task, seed=SEED
    )
    # Site-1's own policy lets it train one round of this run, not two.
    budget = (_epsilon_after(1, site1.data.num_train) + _epsilon_after(2, site1.data.num_train)) / 2
    SitePolicy(max_epsilon=budget, delta=1e-5).save(state / "site-1" / "policy.yaml")
    common = [f"federation.site_state_root={state}", "federation.site_budget=50"]

    proc = medfed_run(tmp_path, root, "run_name=first", *common)
    assert proc.returncode == 0, proc.stderr[-4000:]
    history = RunHistory.load(tmp_path / "outputs" / "first" / "history.json")
    assert set(history.rounds[1].site_train) == {"site-1", "site-2", "site-3"}
    assert set(history.rounds[2].site_train) == {"site-2", "site-3"}
    refusal = history.rounds[2].failures["site-1"]
    assert "privacy budget" in refusal and "no training was done" in refusal
    assert len(read_ledger(state / "site-1" / "ledger.jsonl")) == 1  # nothing overspent
    assert read_ledger(state / "site-1" / "ledger.jsonl")[0].epsilon <= budget

    # The coordinator's copies are the sites' own signed entries, also in MLflow.
    site2 = read_ledger(state / "site-2" / "ledger.jsonl")
    copy = read_ledger(tmp_path / "outputs" / "first" / "ledger" / "site-2.jsonl")
    assert copy == site2 and [e.round for e in copy] == [1, 2]
    assert history.rounds[2].site_train["site-2"]["epsilon"] == site2[-1].epsilon
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs(
        [client.get_experiment_by_name("medfed").experiment_id],
        filter_string="attributes.run_name = 'first'",
    )[0]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "ledger")} == {
        "ledger/site-1.jsonl",
        "ledger/site-2.jsonl",
        "ledger/site-3.jsonl",
    }

    # A new run is new processes: the spend on disk carries over, it is never reset.
    proc = medfed_run(tmp_path, root, "run_name=second", "rounds=1", *common)
    assert proc.returncode == 0, proc.stderr[-4000:]
    second = RunHistory.load(tmp_path / "outputs" / "second" / "history.json")
    assert "privacy budget" in second.rounds[1].failures["site-1"]
    eps_before = history.rounds[2].site_train["site-2"]["epsilon"]
    assert second.rounds[1].site_train["site-2"]["epsilon"] > eps_before

    ledgers = [str(state / s / "ledger.jsonl") for s in ("site-1", "site-2", "site-3")]
    verify = _medfed("audit", "verify", *ledgers, "--keys", str(state), cwd=tmp_path)
    assert verify.returncode == 0, verify.stderr
    assert verify.stdout.count("OK ") == 3

    report = _medfed(
        "audit",
        "report",
        *ledgers,
        "--keys",
        str(state),
        "--output",
        str(tmp_path / "audit"),
        cwd=tmp_path,
    )
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "audit" / "privacy_report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "verified" in page
    summary = json.loads((tmp_path / "audit" / "privacy_report.json").read_text())
    assert all(s["verified"] for s in summary)
    assert {s["spend"][0]["site"] for s in summary} == {"site-1", "site-2", "site-3"}

    # One flipped byte in a site's ledger and the audit fails, saying where.
    path = state / "site-2" / "ledger.jsonl"
    raw = path.read_text().replace('"round": 1,', '"round": 7,', 1)
    path.write_text(raw)
    verify = _medfed("audit", "verify", *ledgers, "--keys", str(state), cwd=tmp_path)
    assert verify.returncode == 1
    assert "site-2/ledger.jsonl: entry 0 (run 'first', round 7)" in verify.stderr
