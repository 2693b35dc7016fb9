"""Provisioning: CA, SuperLink certificate, site kits; idempotent, add and revoke."""

from __future__ import annotations

import ipaddress
import json
import shutil
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from federation.audit import audit_ledgers, key_bindings, load_keys
from federation.enrolment import init_site_keys
from federation.ledger import Mechanism, open_ledger
from federation.provision import (
    CoordinatorKit,
    legacy_private_keys,
    load_consortium,
    provision,
    provision_local,
    revoke_site,
)


def _describe(tmp_path: Path, sites: list[object], **extra: object) -> Path:
    path = tmp_path / "consortium.yaml"
    body = {"name": "t", "coordinator": {"address": "coord.example.org:9092", "san": ["127.0.0.1"]}}
    path.write_text(yaml.safe_dump({**body, "sites": sites, **extra}))
    return path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _enrolled(tmp_path: Path, sites: list[str]):
    """Sites that made their own kits, enrolled and joined; (coordinator kit, output)."""
    description = _describe(tmp_path, sites)
    out = tmp_path / "kits"
    coord = provision_local(description, out, tmp_path / "site-kits")
    return coord, out, description


def test_sites_make_their_keys_and_the_coordinator_holds_no_site_private_key(tmp_path):
    coord, out, _ = _enrolled(tmp_path, ["site-1", "site-2"])
    ca = x509.load_pem_x509_certificate((out / "ca" / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((coord.root / "superlink.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # The consortium's name for the coordinator, and loopback for the coordinator's own use.
    assert san.get_values_for_type(x509.DNSName) == ["coord.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    for site in ("site-1", "site-2"):
        kit = tmp_path / "site-kits" / site
        assert _mode(kit / "supernode.key") == 0o600
        assert _mode(kit / "state" / "site_key.pem") == 0o600
        key = serialization.load_ssh_private_key((kit / "supernode.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        pub = serialization.load_ssh_public_key(
            (coord.root / "site-keys" / f"{site}.pub").read_bytes()
        )
        assert pub.public_numbers() == key.public_key().public_numbers()
        assert (kit / "ca.pem").read_bytes() == (out / "ca" / "ca.pem").read_bytes()
        assert json.loads((kit / "site.json").read_text())["superlink"] == "coord.example.org:9092"
        assert (coord.root / "ledger-keys" / f"{site}.pub").read_bytes() == (
            kit / "state" / "site_key.pub"
        ).read_bytes()
        # The enrolment the binding came from is kept, and verifies.
        coord.enrolment(site).verify(fingerprint=coord.manifest()["sites"][site]["fingerprint"])
    # Nothing under the coordinator's output is a site's private key, or any private key
    # but the CA's and the SuperLink's.
    private = {
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p.is_file() and b"PRIVATE KEY" in p.read_bytes()
    }
    assert private == {"ca/ca.key", "coordinator/superlink.key"}, private
    assert legacy_private_keys(out) == []
    rows, problems = key_bindings(coord.root)
    assert problems == [] and {r["site"] for r in rows} == {"site-1", "site-2"}
    assert all("site-generated" in r["origin"] for r in rows)


def test_enrolment_needs_the_out_of_band_fingerprint_and_intact_proofs(tmp_path):
    description = _describe(tmp_path, ["site-9"])
    out = tmp_path / "kits"
    enrolment = init_site_keys(tmp_path / "kit", "site-9")
    path = tmp_path / "kit" / "enrolment.json"
    with pytest.raises(ValueError, match="fingerprint"):
        provision(description, out, enrol=[(path, "0" * 16)])
    # A swapped ledger key (someone else's) breaks the proof of possession.
    other = init_site_keys(tmp_path / "other", "site-9")
    forged = json.loads(path.read_text()) | {"ledger_key": other.ledger_key}
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    with pytest.raises(ValueError, match="signature does not verify"):
        provision(description, out, enrol=[(tmp_path / "forged.json", enrolment.fingerprint)])
    assert not (out / "coordinator" / "site-keys" / "site-9.pub").exists()
    coord = provision(description, out, enrol=[(path, enrolment.fingerprint)])
    assert coord.active_sites() == ["site-9"]
    assert load_consortium(description).sites == ["site-9"]


def test_rerun_is_idempotent_and_adding_a_site_touches_no_other(tmp_path):
    coord, out, description = _enrolled(tmp_path, ["site-1", "site-2"])
    before = _snapshot(out)
    provision(description, out)
    assert _snapshot(out) == before  # nothing re-keyed, nothing rewritten differently

    coord = provision(description, out, add_sites=["site-3"])
    assert coord.manifest()["sites"]["site-3"]["status"] == "awaiting-enrolment"
    assert coord.active_sites() == ["site-1", "site-2"]
    enrolment = init_site_keys(tmp_path / "site-kits" / "site-3", "site-3")
    path = tmp_path / "site-kits" / "site-3" / "enrolment.json"
    provision(description, out, enrol=[(path, enrolment.fingerprint)])
    after = _snapshot(out)
    changed = {k for k in before if before[k] != after.get(k)}
    assert changed == {"coordinator/consortium.json"}, changed
    assert CoordinatorKit(out / "coordinator").active_sites() == ["site-1", "site-2", "site-3"]
    assert load_consortium(description).sites == ["site-1", "site-2", "site-3"]


def test_legacy_kits_move_over_by_rekeying_and_the_ledger_stays_verifiable(tmp_path):
    coord, out, description = _enrolled(tmp_path, ["site-1"])
    kit = tmp_path / "site-kits" / "site-1"
    ledger = open_ledger(kit / "state", "site-1")
    mech = Mechanism(0.01, 1.1, 1.0, 10, 1e-5)
    ledger.append(run="r", server_round=1, dataset="d", plan="p", mechanism=mech,
                  accountant="rdp", budget=10.0, grad_sample_mode="hooks")  # fmt: skip
    # An older medfed made this site's keys at the coordinator: put such keys there.
    legacy = out / "sites" / "site-1"
    shutil.copy(kit / "supernode.key", legacy / "supernode.key")
    assert legacy_private_keys(out) == [legacy / "supernode.key"]
    old_id = coord.enrolment("site-1").ledger_key_id
    enrolment = init_site_keys(kit, "site-1", rekey=True)
    assert enrolment.replaces["ledger_key_id"] == old_id
    provision(description, out, enrol=[(kit / "enrolment.json", enrolment.fingerprint)])
    assert legacy_private_keys(out) == []
    open_ledger(kit / "state", "site-1").append(
        run="r", server_round=2, dataset="d", plan="p", mechanism=mech,
        accountant="rdp", budget=10.0, grad_sample_mode="hooks",
    )  # fmt: skip
    keys = load_keys([out / "coordinator" / "ledger-keys"])
    assert set(keys) == {"site-1", f"site-1@{old_id}"}
    audits = audit_ledgers([kit / "state" / "ledger.jsonl"], keys)
    assert audits[0].ok, audits[0].problems
    assert [e.key_id for e in audits[0].entries] == [old_id, enrolment.ledger_key_id]
    rows, problems = key_bindings(out / "coordinator")
    assert problems == [] and rows[0]["retired"][0]["ledger_key_id"] == old_id
    # A new enrolment that does not name the enrolled key is refused.
    other = init_site_keys(tmp_path / "other", "site-1")
    with pytest.raises(ValueError, match="already enrolled"):
        provision(description, out, enrol=[(tmp_path / "other" / "enrolment.json",
                                            other.fingerprint)])  # fmt: skip


def test_revoke_drops_the_key_and_a_revoked_site_is_never_reactivated(tmp_path):
    _, out, description = _enrolled(tmp_path, ["site-1", "site-2"])
    revoked = revoke_site(out / "coordinator", "site-2", description=description)
    assert revoked.name == "site-2.pub.revoked" and revoked.exists()
    assert not (out / "coordinator" / "site-keys" / "site-2.pub").exists()
    manifest = json.loads((out / "coordinator" / "consortium.json").read_text())
    assert manifest["sites"]["site-2"]["status"] == "revoked"
    assert load_consortium(description).sites == ["site-1"]
    provision(description, out)  # still fine without it
    with pytest.raises(ValueError, match="site 'site-2' was revoked"):
        provision(description, out, add_sites=["site-2"])
    with pytest.raises(ValueError, match="not in"):
        revoke_site(out / "coordinator", "nobody")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"coordinator": {"address": "no-port"}, "sites": ["a"]}, "must be host:port"),
        ({"coordinator": {"address": "h:1"}, "sites": []}, "sites is empty"),
        ({"coordinator": {"address": "h:1"}, "sites": ["a", "a"]}, "duplicate"),
        ({"coordinator": {"address": "h:1"}, "sites": ["../x"]}, "not a valid name"),
        ({"coordinator": {"address": "h:1"}, "sites": ["a"], "extra": 1}, "unknown keys"),
    ],
)
def test_bad_descriptions_are_rejected_with_the_reason(tmp_path, body, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(ValueError, match=message):
        load_consortium(path)
