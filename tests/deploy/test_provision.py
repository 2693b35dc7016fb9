"""Provisioning: CA, SuperLink certificate, site kits; idempotent, add and revoke."""

from __future__ import annotations

import ipaddress
import json
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from federation.provision import load_consortium, provision, revoke_site


def _describe(tmp_path: Path, sites: list[object], **extra: object) -> Path:
    path = tmp_path / "consortium.yaml"
    body = {"name": "t", "coordinator": {"address": "coord.example.org:9092", "san": ["127.0.0.1"]}}
    path.write_text(yaml.safe_dump({**body, "sites": sites, **extra}))
    return path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_kits_hold_what_each_party_needs_with_private_keys_0600(tmp_path):
    out = tmp_path / "kits"
    coord = provision(_describe(tmp_path, ["site-1", {"name": "site-2"}]), out)
    ca = x509.load_pem_x509_certificate((out / "ca" / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((coord.root / "superlink.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["coord.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    private = [out / "ca" / "ca.key", coord.root / "superlink.key"]
    for site in ("site-1", "site-2"):
        kit = out / "sites" / site
        private += [kit / "supernode.key", kit / "state" / "site_key.pem"]
        # The SuperNode key is what flower-supernode loads: OpenSSH, EC (NIST curve).
        key = serialization.load_ssh_private_key((kit / "supernode.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        pub = serialization.load_ssh_public_key(
            (coord.root / "site-keys" / f"{site}.pub").read_bytes()
        )
        assert pub.public_numbers() == key.public_key().public_numbers()
        assert (kit / "ca.pem").read_bytes() == (out / "ca" / "ca.pem").read_bytes()
        assert json.loads((kit / "site.json").read_text())["superlink"] == "coord.example.org:9092"
        assert "medfed site start --kit" in (kit / "README.md").read_text()
        assert (coord.root / "ledger-keys" / f"{site}.pub").read_bytes() == (
            kit / "state" / "site_key.pub"
        ).read_bytes()
        # No private key of anyone else in a site's kit.
        names = {p.name for p in kit.rglob("*")}
        assert not names & {"ca.key", "superlink.key"}
    assert all(_mode(p) == 0o600 for p in private), {str(p): oct(_mode(p)) for p in private}
    assert not any(
        p.name.endswith(".key") for p in coord.root.rglob("*") if p.name != "superlink.key"
    )
    assert coord.active_sites() == ["site-1", "site-2"]


def test_rerun_is_idempotent_and_adding_a_site_touches_no_other(tmp_path):
    description = _describe(tmp_path, ["site-1", "site-2"])
    out = tmp_path / "kits"
    provision(description, out)
    before = _snapshot(out)
    provision(description, out)
    assert _snapshot(out) == before  # nothing re-keyed, nothing rewritten differently

    coord = provision(description, out, add_sites=["site-3"])
    after = _snapshot(out)
    changed = {k for k in before if before[k] != after.get(k)}
    assert changed == {"coordinator/consortium.json"}, changed
    assert coord.active_sites() == ["site-1", "site-2", "site-3"]
    assert (out / "sites" / "site-3" / "supernode.key").exists()
    assert [s for s in load_consortium(description).sites] == ["site-1", "site-2", "site-3"]


def test_revoke_drops_the_key_and_a_revoked_site_is_never_reactivated(tmp_path):
    description = _describe(tmp_path, ["site-1", "site-2"])
    out = tmp_path / "kits"
    provision(description, out)
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
