"""Site governance: policy limits, plan review and approval, the signed audit log."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import yaml

from client.governance import GovernancePolicy, RunRequest
from client.state import SitePolicy, SiteState
from federation.appdigest import release_digest
from federation.compose import compose_config
from federation.config import plan_hash
from federation.security import load_public_key
from medfed.cli import main as medfed
from server.loop import RunHistory, site_config
from tests.helpers import SMALL, medfed_run

REQUEST = RunRequest(
    task="seg2d",
    rounds=5,
    num_train=40,
    privacy_mode="dp-sgd",
    noise_multiplier=1.1,
    accountant="rdp",
    run_epsilon=6.0,
)


@pytest.mark.parametrize(
    ("limits", "named", "within"),
    [
        ({"allowed_tasks": ["cls3d"]}, "allowed_tasks", {"task": "cls3d"}),
        ({"max_rounds": 3}, "max_rounds=3", {"rounds": 3}),
        ({"min_dataset_size": 100}, "min_dataset_size=100", {"num_train": 100}),
        ({"min_noise_multiplier": 1.5}, "min_noise_multiplier=1.5", {"noise_multiplier": 1.5}),
        ({"max_epsilon_per_run": 4.0}, "max_epsilon_per_run=4", {"run_epsilon": 4.0}),
        ({"allowed_accountants": ["prv"]}, "allowed_accountants", {"accountant": "prv"}),
    ],
)
def test_each_policy_limit_refuses_naming_itself(limits, named, within):
    policy = GovernancePolicy.from_dict(limits)
    (problem,) = policy.violations(REQUEST)
    assert named in problem
    # The same limit, and a run brought within it (exactly at the limit): accepted.
    assert policy.violations(dataclasses.replace(REQUEST, **within)) == []


def test_dp_limits_require_dp_sgd_and_bad_settings_are_named():
    policy = GovernancePolicy.from_dict({"min_noise_multiplier": 1.0})
    (problem,) = policy.violations(RunRequest("seg2d", 1, 40, "none", None, "rdp", None))
    assert "privacy.mode='none'" in problem and "min_noise_multiplier" in problem
    with pytest.raises(ValueError, match="unknown governance setting"):
        GovernancePolicy.from_dict({"max_round": 3})
    with pytest.raises(ValueError, match="max_rounds=0 must be > 0"):
        GovernancePolicy.from_dict({"max_rounds": 0})


def test_policy_sections_survive_each_other(tmp_path):
    state = tmp_path / "site-1"
    assert medfed(["site", "policy", "--state", str(state), "--max-epsilon", "8"]) == 0
    assert (
        medfed(
            [
                "site",
                "policy",
                "--state",
                str(state),
                "--require-plan-approval",
                "--max-rounds",
                "4",
                "--allowed-accountants",
                "rdp",
            ]
        )
        == 0
    )
    SitePolicy(max_epsilon=6, delta=1e-5).save(state / "policy.yaml")  # budget changed
    site = SiteState(state, "site-1")
    assert site.policy().max_epsilon == 6
    governance = site.governance()
    assert governance.require_plan_approval and governance.max_rounds == 4
    assert governance.allowed_accountants == ("rdp",)
    assert medfed(["site", "policy", "--state", str(state), "--max-rounds", "0"]) == 0
    assert site.governance().max_rounds is None and site.governance().require_plan_approval
    raw = yaml.safe_load((state / "policy.yaml").read_text())
    assert set(raw) == {"privacy", "governance"}


def _flat(*overrides: str) -> dict:
    cfg = compose_config(["task.image_size=32", *overrides])
    return dict(site_config(cfg, "run-a"))


def test_plans_review_approve_revoke_and_a_signed_audit_log(tmp_path, capsys):
    state = tmp_path / "site-1"
    plans = SiteState(state, "site-1").plans
    first = plans.request(_flat(), run="run-a")
    # The plan names the code too: by default the site's own release.
    assert first == plan_hash(_flat(), app=str(release_digest()))
    assert plans.status(first) == "pending"
    elsewhere = SiteState(tmp_path / "site-x", "site-x").plans
    other_code = elsewhere.request(_flat(), run="run-a", app="0" * 64)
    assert other_code != first and elsewhere.document(other_code)["app"] == "0" * 64
    assert plans.request(_flat(), run="run-a") == first  # asked again: one record
    assert (
        medfed(["site", "plans", "approve", first[:6], "--by", "Dr. Ada", "--state", str(state)])
        == 0
    )
    assert plans.status(first) == "approved"
    second = plans.request(_flat("privacy.noise_multiplier=0.8", "rounds=20"), run="run-b")
    assert second != first and plans.status(second) == "pending"
    capsys.readouterr()
    assert medfed(["site", "plans", "show", second, "--state", str(state)]) == 0
    shown = capsys.readouterr().out
    assert "noise multiplier 0.8" in shown and "status: pending" in shown
    assert f"previously approved plan {first}" in shown
    assert "privacy.noise_multiplier: 1.3 -> 0.8" in shown and "rounds: 10 -> 20" in shown
    assert medfed(["site", "plans", "list", "--state", str(state)]) == 0
    listed = capsys.readouterr().out
    assert f"{first}  approved by Dr. Ada" in listed and f"{second}  pending" in listed
    assert (
        medfed(
            [
                "site",
                "plans",
                "revoke",
                first,
                "--by",
                "Dr. Bo",
                "--reason",
                "new data",
                "--state",
                str(state),
            ]
        )
        == 0
    )
    assert plans.status(first) == "revoked"
    # Errors say what is wrong and what to do.
    assert medfed(["site", "plans", "approve", "ffff", "--by", "x", "--state", str(state)]) == 2
    assert "no known plan" in capsys.readouterr().err
    with pytest.raises(ValueError, match="only an approved plan can be revoked"):
        plans.revoke(second, by="Dr. Bo")

    entries = plans.audit.entries()
    assert [(e["action"], e["by"]) for e in entries] == [
        ("requested", "coordinator"),
        ("approved", "Dr. Ada"),
        ("requested", "coordinator"),
        ("revoked", "Dr. Bo"),
    ]
    assert entries[1]["time"] and entries[3]["details"]["reason"] == "new data"
    key = load_public_key(state / "site_key.pub")
    assert plans.audit.verify(key) == []
    lines = (state / "audit.jsonl").read_text().splitlines()
    edited = json.loads(lines[1])
    edited["by"] = "Mallory"
    lines[1] = json.dumps(edited)
    (state / "audit.jsonl").write_text("\n".join(lines) + "\n")
    problems = plans.audit.verify(key)
    assert any("entry 1" in p and "edited" in p for p in problems)


def test_unapproved_plan_refused_approved_one_trains_and_limits_apply(tmp_path, consortium):
    root, _ = consortium
    state = tmp_path / "site-state"
    run = ["run_name=governed", "federation.min_sites=1", "rounds=1"]
    for site in ("site-1", "site-2", "site-3"):
        SitePolicy(max_epsilon=50, delta=1e-5).save(state / site / "policy.yaml")
    for site in ("site-1", "site-2"):
        assert (
            medfed(["site", "policy", "--state", str(state / site), "--require-plan-approval"]) == 0
        )
    assert (
        medfed(["site", "policy", "--state", str(state / "site-3"), "--min-noise-multiplier", "2"])
        == 0
    )
    # The coordinator publishes its run's overrides; site-1 registers, reviews and
    # approves the plan ahead of the run.

    flat = dict(site_config(compose_config([*SMALL, *run]), "governed"))
    plan = plan_hash(flat, app=str(release_digest()))
    assert medfed(["site", "plans", "add", "--state", str(state / "site-1"), *SMALL, *run]) == 0
    assert (
        medfed(
            [
                "site",
                "plans",
                "approve",
                plan[:8],
                "--by",
                "Dr. Ada",
                "--state",
                str(state / "site-1"),
            ]
        )
        == 0
    )

    proc = medfed_run(tmp_path, root, *run)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = RunHistory.load(tmp_path / "outputs" / "governed" / "history.json").rounds[1]
    assert set(record.site_train) == {"site-1"}
    assert (
        f"training plan {plan} is not approved at this site (unknown)"
        in (record.failures["site-2"])
    )
    assert (
        "noise multiplier 1.3 is below the site's min_noise_multiplier=2"
        in (record.failures["site-3"])
    )
    # site-2 now holds the plan, pending its review; site-1 recorded its request.
    site2 = SiteState(state / "site-2", "site-2").plans
    assert site2.status(plan) == "pending"
    assert site2.document(plan)["config"]["privacy.noise_multiplier"] == 1.3
    assert SiteState(state / "site-1", "site-1").ledger.entries()[0].plan == plan
    assert not (state / "site-2" / "ledger.jsonl").exists()
    listed = subprocess.run(
        [
            sys.executable,
            "-m",
            "medfed.cli",
            "site",
            "plans",
            "list",
            "--state",
            str(state / "site-2"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert f"{plan}  pending" in listed.stdout and "governed" in listed.stdout
