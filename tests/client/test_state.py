import os
import stat

import pytest
import torch

from client.state import SitePolicy, SiteState
from federation.errors import SiteRefusal
from federation.ledger import Mechanism


def _mech(steps=20, delta=1e-5):
    return Mechanism(
        sample_rate=0.1, noise_multiplier=1.0, max_grad_norm=1.0, steps=steps, delta=delta
    )


def _charge(state, run="run-1", server_round=1, dataset="ds-1"):
    entry = state.ledger.append(
        run=run,
        server_round=server_round,
        dataset=dataset,
        plan="p",
        mechanism=_mech(),
        accountant="rdp",
        budget=100.0,
        grad_sample_mode="hooks",
    )
    state.store_reply(run, entry, {"state_dict": {"w": torch.ones(2)}, "metrics": {"x": 1.0}})
    return entry


def test_without_a_policy_the_site_refuses_and_says_how_to_set_one(tmp_path):
    state = SiteState(tmp_path, "st-mary")
    with pytest.raises(SiteRefusal, match="medfed site policy"):
        state.check_budget(dataset="ds-1", planned=_mech(), accountant="rdp")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("privacy: {max_epsilon: -1, delta: 1e-5}", "max_epsilon must be > 0"),
        ("privacy: {delta: 1e-5}", "max_epsilon"),
        ("budget: 3", "privacy"),
    ],
)
def test_invalid_policies_are_refused_with_the_problem(tmp_path, text, fragment):
    (tmp_path / "policy.yaml").write_text(text)
    with pytest.raises(SiteRefusal, match=fragment):
        SiteState(tmp_path, "s").policy()


def test_the_round_that_would_cross_the_budget_is_refused(tmp_path):
    SitePolicy(max_epsilon=5.0, delta=1e-5).save(tmp_path / "policy.yaml")
    state = SiteState(tmp_path, "s")
    after, budget = state.check_budget(dataset="ds-1", planned=_mech(), accountant="rdp")
    assert 0 < after < budget == 5.0
    charged = 0
    with pytest.raises(SiteRefusal, match="over the site's budget of 5") as err:
        for r in range(1, 50):
            state.check_budget(dataset="ds-1", planned=_mech(), accountant="rdp")
            _charge(state, server_round=r)
            charged += 1
    assert "no training was done" in str(err.value)
    assert 0 < charged < 49
    assert state.ledger.entries()[-1].epsilon <= 5.0
    # Another dataset has its own budget.
    state.check_budget(dataset="ds-2", planned=_mech(), accountant="rdp")


def test_spend_survives_a_restart(tmp_path):
    SitePolicy(max_epsilon=50.0, delta=1e-5).save(tmp_path / "policy.yaml")
    first = SiteState(tmp_path, "s")
    before, _ = first.check_budget(dataset="ds-1", planned=_mech(), accountant="rdp")
    _charge(first)
    restarted = SiteState(tmp_path, "s")  # a new process would build exactly this
    after, _ = restarted.check_budget(dataset="ds-1", planned=_mech(), accountant="rdp")
    assert after > before


def test_a_repeated_round_is_answered_from_store_never_charged_twice(tmp_path):
    state = SiteState(tmp_path, "s")
    assert state.stored_reply("run-1", 1) is None
    entry = _charge(state, server_round=1)
    stored_entry, payload = state.stored_reply("run-1", 1)
    assert stored_entry == entry
    assert torch.equal(payload["state_dict"]["w"], torch.ones(2))
    _charge(state, server_round=2)  # the store keeps only the run's latest reply
    with pytest.raises(SiteRefusal, match="spend privacy twice"):
        state.stored_reply("run-1", 1)
    assert len(state.ledger.entries()) == 2


def test_a_run_at_another_delta_is_refused(tmp_path):
    SitePolicy(max_epsilon=5.0, delta=1e-5).save(tmp_path / "policy.yaml")
    with pytest.raises(SiteRefusal, match=r"privacy\.delta=1e-05"):
        SiteState(tmp_path, "s").check_budget(
            dataset="d", planned=_mech(delta=1e-6), accountant="rdp"
        )


def test_signing_key_is_private_to_the_site(tmp_path):
    _ = SiteState(tmp_path, "s").ledger
    mode = stat.S_IMODE(os.stat(tmp_path / "site_key.pem").st_mode)
    assert mode == 0o600
    os.chmod(tmp_path / "site_key.pem", 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        _ = SiteState(tmp_path, "s").ledger
