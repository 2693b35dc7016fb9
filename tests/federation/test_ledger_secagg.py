"""Ledger entries record secure aggregation without breaking entries written before it."""

import base64
import hashlib
import json
import re

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from federation.compose import compose_config
from federation.ledger import Ledger, Mechanism, read_ledger, verify_ledger

MECH = Mechanism(sample_rate=0.1, noise_multiplier=1.2, max_grad_norm=1.0, steps=5, delta=1e-5)


def _append(ledger, server_round, secure=""):
    return ledger.append(
        run="r",
        server_round=server_round,
        dataset="ds",
        plan="p",
        mechanism=MECH,
        accountant="rdp",
        budget=50.0,
        grad_sample_mode="hooks",
        secure_aggregation=secure,
    )


def test_old_and_new_entries_verify_and_the_flag_is_signed(tmp_path):
    key = Ed25519PrivateKey.generate()
    ledger = Ledger(tmp_path / "ledger.jsonl", key, "site-a")
    old = _append(ledger, 1)
    line = (tmp_path / "ledger.jsonl").read_text().splitlines()[0]
    # An entry without secure aggregation is byte-for-byte what older medfed wrote: the
    # field is absent and the hash covers exactly the old fields.
    raw = json.loads(line)
    assert "secure_aggregation" not in raw
    body = {k: v for k, v in raw.items() if k not in ("hash", "signature")}
    digest = hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    assert digest == old.hash
    key.public_key().verify(base64.b64decode(raw["signature"]), digest.encode())

    new = _append(ledger, 2, secure="secaggplus")
    assert new.secure_aggregation == "secaggplus"
    entries = read_ledger(tmp_path / "ledger.jsonl")
    assert [e.secure_aggregation for e in entries] == ["", "secaggplus"]
    assert verify_ledger(entries, {"site-a": key.public_key()}) == []

    # Claiming (or denying) secure aggregation after the fact breaks the signature chain.
    lines = (tmp_path / "ledger.jsonl").read_text().splitlines()
    forged = json.loads(lines[1])
    forged.pop("secure_aggregation")
    (tmp_path / "ledger.jsonl").write_text(lines[0] + "\n" + json.dumps(forged) + "\n")
    problems = verify_ledger(read_ledger(tmp_path / "ledger.jsonl"), {"site-a": key.public_key()})
    assert any("entry 1" in p and "edited" in p for p in problems)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("strategy=fedprox", "cannot be combined with strategy.name"),
        ("privacy=central", "cannot be combined with privacy.mode=central"),
        ("strategy=fedbn", "cannot be combined with strategy.name, strategy.local_norm"),
        ("federation.update_encoding=fp16-delta", "cannot be combined with federation.update_enc"),
        ("federation.secure_aggregation=secagg", "is unknown; use none or secaggplus"),
        ("federation.num_sites=2", "needs at least 3 sites"),
        ("federation.secagg_threshold=0", "secagg_threshold=0.0 must lie in"),
    ],
)
def test_secure_aggregation_rejects_what_it_cannot_do(override, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        compose_config(["federation.secure_aggregation=secaggplus", override])
