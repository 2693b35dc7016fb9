"""The ledger detects every kind of tampering an auditor cares about."""

import json
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from federation.ledger import (
    GENESIS,
    BudgetExceeded,
    Ledger,
    LedgerEntry,
    Mechanism,
    read_ledger,
    verify_ledger,
)


def _mech(steps=10, noise=1.1, rate=0.05):
    return Mechanism(
        sample_rate=rate, noise_multiplier=noise, max_grad_norm=1.0, steps=steps, delta=1e-5
    )


def _ledger(tmp_path, site="site-a", key=None, rounds=4, accountant="rdp"):
    ledger = Ledger(tmp_path / f"{site}.jsonl", key or Ed25519PrivateKey.generate(), site)
    for r in range(1, rounds + 1):
        ledger.append(
            run="run-1",
            server_round=r,
            dataset="ds-1",
            plan="p",
            mechanism=_mech(),
            accountant=accountant,
            budget=10.0,
            grad_sample_mode="hooks",
        )
    return ledger


def _keys(*ledgers):
    return {lg.site: lg.key.public_key() for lg in ledgers}


def _lines(ledger):
    return ledger.path.read_text().splitlines()


def _verify_lines(lines, keys):
    return verify_ledger([LedgerEntry.from_json(x) for x in lines], keys)


def test_an_untouched_ledger_verifies_and_epsilon_accumulates(tmp_path):
    ledger = _ledger(tmp_path)
    entries = ledger.entries()
    assert verify_ledger(entries, _keys(ledger)) == []
    assert entries[0].prev_hash == GENESIS
    assert [e.index for e in entries] == [0, 1, 2, 3]
    eps = [e.epsilon for e in entries]
    assert eps == sorted(eps) and eps[0] > 0


def test_prv_entries_verify_too(tmp_path):
    ledger = _ledger(tmp_path, accountant="prv", rounds=2)
    assert verify_ledger(ledger.entries(), _keys(ledger)) == []


def test_byte_flip_is_detected(tmp_path):
    ledger = _ledger(tmp_path)
    raw = bytearray(ledger.path.read_bytes())
    at = raw.index(b'"plan": "p"') + len('"plan": "')
    raw[at] ^= 0x01  # 'p' -> 'q'
    ledger.path.write_bytes(bytes(raw))
    problems = verify_ledger(read_ledger(ledger.path), _keys(ledger))
    assert any("does not match its hash: the entry was edited" in p for p in problems)


def test_deleted_entry_is_detected(tmp_path):
    ledger = _ledger(tmp_path)
    lines = _lines(ledger)
    del lines[1]
    problems = _verify_lines(lines, _keys(ledger))
    assert any("entry 1" in p and "removed, inserted or reordered" in p for p in problems)


def test_deleting_the_last_entries_is_detected_against_the_coordinators_copy(tmp_path):
    # Truncation keeps a valid chain; the coordinator's signed copies expose it.
    ledger = _ledger(tmp_path)
    full = ledger.entries()
    truncated = full[:2]
    assert verify_ledger(truncated, _keys(ledger)) == []
    assert {e.hash for e in full} - {e.hash for e in truncated}


def test_reordered_entries_are_detected(tmp_path):
    ledger = _ledger(tmp_path)
    lines = _lines(ledger)
    lines[1], lines[2] = lines[2], lines[1]
    problems = _verify_lines(lines, _keys(ledger))
    assert any("removed, inserted or reordered" in p for p in problems)


def test_entry_signed_with_another_sites_key_is_detected(tmp_path):
    ours = _ledger(tmp_path, site="site-a")
    other_key = Ed25519PrivateKey.generate()
    entries = ours.entries()
    entries[2] = replace(entries[2], hash="", signature="").signed(other_key)
    problems = verify_ledger(entries, _keys(ours))
    assert any("entry 2" in p and "not by site 'site-a'" in p for p in problems)


def test_edited_epsilon_is_detected_even_when_rehashed(tmp_path):
    ledger = _ledger(tmp_path)
    entries = ledger.entries()
    lowered = replace(entries[3], epsilon=entries[3].epsilon / 2)
    # Edited in place: the hash no longer matches.
    problems = verify_ledger([*entries[:3], lowered], _keys(ledger))
    assert any("the entry was edited" in p for p in problems)
    assert any("claims epsilon" in p for p in problems)
    # Re-hashed by someone without the key: the signature fails.
    rehashed = replace(lowered, hash=lowered.digest())
    problems = verify_ledger([*entries[:3], rehashed], _keys(ledger))
    assert any("signature is not by site" in p for p in problems)
    # Even a site re-signing a false epsilon is caught by recomputation.
    resigned = replace(lowered, hash="", signature="").signed(ledger.key)
    problems = verify_ledger([*entries[:3], resigned], _keys(ledger))
    assert problems == [
        f"ledger: entry 3 (run 'run-1', round 4): claims epsilon {lowered.epsilon!r}, "
        f"the mechanism gives {entries[3].epsilon!r}"
    ]


def test_unknown_site_and_garbage_lines_are_reported(tmp_path):
    ledger = _ledger(tmp_path, rounds=1)
    assert any("no public key for site 'site-a'" in p for p in verify_ledger(ledger.entries(), {}))
    ledger.path.write_text(ledger.path.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"site-a.jsonl:2"):
        read_ledger(ledger.path)


@settings(
    deadline=None, max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(st.integers(1, 40), min_size=2, max_size=6),
    data=st.data(),
)
def test_any_single_change_to_a_chain_is_detected(tmp_path_factory, steps, data):
    key = Ed25519PrivateKey.generate()
    ledger = Ledger(tmp_path_factory.mktemp("chain") / "l.jsonl", key, "s")
    for r, t in enumerate(steps, start=1):
        ledger.append(
            run="r",
            server_round=r,
            dataset="d",
            plan="p",
            mechanism=_mech(steps=t),
            accountant="rdp",
            budget=50.0,
            grad_sample_mode="hooks",
        )
    entries = ledger.entries()
    keys = {"s": key.public_key()}
    assert verify_ledger(entries, keys) == []
    victim = data.draw(st.integers(0, len(entries) - 1))
    change = data.draw(st.sampled_from(["drop", "swap", "steps", "noise", "round"]))
    tampered = list(entries)
    if change == "drop":
        del tampered[victim]
        if victim == len(entries) - 1:
            return  # truncating the tail is caught against the coordinator's copy instead
    elif change == "swap":
        other = (victim + 1) % len(entries)
        tampered[victim], tampered[other] = tampered[other], tampered[victim]
    else:
        e = tampered[victim]
        if change == "steps":
            tampered[victim] = replace(
                e, mechanism=replace(e.mechanism, steps=e.mechanism.steps + 1)
            )
        elif change == "noise":
            tampered[victim] = replace(e, mechanism=replace(e.mechanism, noise_multiplier=9.0))
        else:
            tampered[victim] = replace(e, round=e.round + 100)
    assert verify_ledger(tampered, keys) != []


def test_entries_round_trip_through_json(tmp_path):
    entry = _ledger(tmp_path, rounds=1).entries()[0]
    assert LedgerEntry.from_json(entry.to_json()) == entry
    assert json.loads(entry.to_json())["mechanism"]["steps"] == 10


def test_append_refuses_to_cross_the_budget_under_its_lock(tmp_path):
    ledger = Ledger(tmp_path / "l.jsonl", Ed25519PrivateKey.generate(), "s")
    kwargs = {
        "run": "r",
        "dataset": "d",
        "plan": "p",
        "mechanism": _mech(steps=40),
        "accountant": "rdp",
        "grad_sample_mode": "hooks",
    }
    first = ledger.append(server_round=1, budget=100.0, **kwargs)
    with pytest.raises(BudgetExceeded, match="must not be released"):
        ledger.append(server_round=2, budget=first.epsilon * 1.01, **kwargs)
    assert len(ledger.entries()) == 1
