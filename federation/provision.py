"""Consortium provisioning: CA, SuperLink certificate, enrolment of site-owned keys.

A consortium description (YAML) names the coordinator's address and the sites:

    name: lung-consortium
    coordinator:
      address: coordinator.example.org:9092   # host:port the sites dial (outbound only)
      san: [localhost, 127.0.0.1]              # extra names/IPs for the certificate
    budget: {max_epsilon: 10.0, delta: 1.0e-5} # optional default site policy
    sites: [site-1, site-2, {name: site-3}]

Sites make their own keys (`federation.enrolment`, `medfed site init`); the coordinator
enrols each site's signed enrolment file, which holds public keys only. `provision`
writes, under one output folder:

    ca/               consortium CA certificate and its private key (stays here)
    coordinator/      coordinator kit: CA, SuperLink certificate and key, the sites'
                      enrolment files, SuperNode public keys and ledger public keys,
                      manifest, README
    sites/<name>/     what goes back to an enrolled site: CA certificate, site.json,
                      the consortium's default policy, README (public files only)

Re-running is idempotent: nothing existing is re-keyed. A listed site without an
enrolment waits for one and cannot connect. Revoking a site marks it in the manifest
and removes its public key from the coordinator kit; `server.deploy` unregisters it
from a running SuperLink. No site private key is ever written here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.enrolment import (
    ENROLMENT_FILE,
    NODE_KEY,
    NODE_PUB,
    Enrolment,
    check_name,
    init_site_keys,
    read_enrolment,
)
from federation.files import write_atomically
from federation.ledger import KEY_FILE

__all__ = [
    "CA_CERT",
    "MANIFEST",
    "Consortium",
    "CoordinatorKit",
    "SiteKit",
    "join_site",
    "legacy_private_keys",
    "load_consortium",
    "provision",
    "provision_local",
    "revoke_site",
]

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SUPERLINK_CERT = "superlink.pem"
SUPERLINK_KEY = "superlink.key"
SITE_FILE = "site.json"
MANIFEST = "consortium.json"
SITE_KEYS_DIR = "site-keys"
LEDGER_KEYS_DIR = "ledger-keys"
ENROLMENTS_DIR = "enrolments"
STATE_DIR = "state"
POLICY_FILE = "policy.yaml"
AWAITING = "awaiting-enrolment"
# Always in the SuperLink's certificate: the coordinator reaches it on loopback.
_LOOPBACK_NAMES = ["localhost", "127.0.0.1"]
_VALID_DAYS = 825


@dataclass(frozen=True)
class Consortium:
    """What the consortium description says."""

    name: str
    address: str
    sites: list[str]
    san: list[str] = field(default_factory=list)
    budget: dict[str, float] | None = None

    @property
    def host(self) -> str:
        """Host part of the coordinator's address."""
        return self.address.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        """Port part of the coordinator's address."""
        return int(self.address.rsplit(":", 1)[1])


def load_consortium(path: Path) -> Consortium:
    """Read and check a consortium description (YAML).

    Raises:
        ValueError: A key is missing or malformed; the message names it.
    """
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as err:
        raise ValueError(f"consortium description {path} does not exist") from err
    except yaml.YAMLError as err:
        raise ValueError(f"consortium description {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping with name, coordinator and sites")
    unknown = set(raw) - {"name", "coordinator", "sites", "budget"}
    if unknown:
        raise ValueError(
            f"{path}: unknown keys {sorted(unknown)}; allowed: name, coordinator, sites, budget"
        )
    coord = raw.get("coordinator") or {}
    address = str(coord.get("address", "")) if isinstance(coord, dict) else ""
    if not re.match(r"^[^\s:]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$", address):
        raise ValueError(
            f"{path}: coordinator.address={address!r} must be host:port, the address "
            "the sites dial, e.g. coordinator.example.org:9092"
        )
    sites: list[str] = []
    for item in raw.get("sites") or []:
        name = item.get("name") if isinstance(item, dict) else item
        sites.append(check_name(str(name), "site name"))
    if not sites:
        raise ValueError(f"{path}: sites is empty; list at least one site name")
    if len(set(sites)) != len(sites):
        raise ValueError(f"{path}: duplicate site names in {sites}")
    budget = raw.get("budget")
    if budget is not None and (
        not isinstance(budget, dict) or set(budget) != {"max_epsilon", "delta"}
    ):
        raise ValueError(f"{path}: budget must be {{max_epsilon: E, delta: D}}, got {budget!r}")
    return Consortium(
        name=check_name(str(raw.get("name", "consortium")), "consortium name"),
        address=address,
        sites=sites,
        san=[str(s) for s in coord.get("san") or []],
        budget={k: float(v) for k, v in budget.items()} if budget else None,
    )


def _write_private(path: Path, data: bytes) -> None:
    """Create a file readable by its owner only; an existing file is never replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _write_public(path: Path, data: bytes | str) -> None:
    write_atomically(path, data, mode=0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not an EC private key")
    return key


def _ensure_ca(root: Path, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key_path, cert_path = root / "ca" / CA_KEY, root / "ca" / CA_CERT
    if key_path.exists() and cert_path.exists():
        return x509.load_pem_x509_certificate(cert_path.read_bytes()), _load_key(key_path)
    if key_path.exists() or cert_path.exists():
        raise ValueError(
            f"{root / 'ca'} holds only one of {CA_CERT} and {CA_KEY}; restore the missing "
            "file from backup (a new CA would invalidate every kit)"
        )
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} consortium CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA384())
    )
    _write_private(key_path, _pem_key(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _san_entries(names: list[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def _cert_names(cert: x509.Certificate) -> set[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    }


def _ensure_server_cert(
    kit: Path, consortium: Consortium, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
) -> None:
    """SuperLink certificate for the coordinator's host (and `san`), signed by the CA.

    Re-issued (same key) only when the wanted names changed.
    """
    names = [consortium.host, *consortium.san, *_LOOPBACK_NAMES]
    cert_path, key_path = kit / SUPERLINK_CERT, kit / SUPERLINK_KEY
    if cert_path.exists() and key_path.exists():
        current = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if _cert_names(current) == {str(e.value) for e in _san_entries(names)}:
            return
    if not key_path.exists():
        _write_private(key_path, _pem_key(ec.generate_private_key(ec.SECP384R1())))
    key = _load_key(key_path)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, consortium.host)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(_san_entries(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))


@dataclass(frozen=True)
class SiteKit:
    """A site's kit folder (on the site's machine): its own keys plus what it joined with."""

    root: Path

    @property
    def name(self) -> str:
        """The site's name."""
        return str(self.info()["site"])

    def info(self) -> dict[str, Any]:
        """Contents of `site.json` (site name, consortium, SuperLink address)."""
        path = self.root / SITE_FILE
        if not path.exists():
            hint = (
                "it has keys but has not joined: `medfed site join --kit KIT --bundle DIR` "
                "with the folder the coordinator sent back"
                if (self.root / ENROLMENT_FILE).exists()
                else "make one with `medfed site init --name NAME --kit DIR`, then enrol and join"
            )
            raise ValueError(f"{self.root} is not a joined site kit (no {SITE_FILE}); {hint}")
        info: dict[str, Any] = json.loads(path.read_text())
        return info

    @property
    def ca(self) -> Path:
        """The consortium CA certificate the site trusts."""
        return self.root / CA_CERT

    @property
    def node_key(self) -> Path:
        """The SuperNode's authentication private key (OpenSSH, 0600)."""
        return self.root / NODE_KEY

    @property
    def node_pub(self) -> Path:
        """The SuperNode's authentication public key (OpenSSH)."""
        return self.root / NODE_PUB

    @property
    def state(self) -> Path:
        """Default state folder: policy, ledger signing key, ledger."""
        return self.root / STATE_DIR


@dataclass(frozen=True)
class CoordinatorKit:
    """The coordinator's startup kit folder and its manifest."""

    root: Path

    def manifest(self) -> dict[str, Any]:
        """Contents of the manifest: consortium, address, sites and their status."""
        path = self.root / MANIFEST
        if not path.exists():
            raise ValueError(
                f"{self.root} is not a coordinator kit (no {MANIFEST}); pass the folder "
                "that `medfed provision` wrote (OUTPUT/coordinator)"
            )
        manifest: dict[str, Any] = json.loads(path.read_text())
        return manifest

    def save_manifest(self, manifest: dict[str, Any]) -> None:
        """Replace the manifest atomically."""
        _write_public(self.root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    def active_sites(self) -> list[str]:
        """Sites that are enrolled and not revoked, in provisioning order."""
        sites = self.manifest()["sites"]
        return [name for name, s in sites.items() if s["status"] == "active"]

    def site_key(self, site: str) -> Path:
        """A site's SuperNode public key, as registered with the SuperLink."""
        return self.root / SITE_KEYS_DIR / f"{site}.pub"

    def enrolment(self, site: str) -> Enrolment:
        """The enrolment a site's keys were registered from."""
        return read_enrolment(self.root / ENROLMENTS_DIR / f"{site}.json")

    @property
    def ca(self) -> Path:
        """The consortium CA certificate."""
        return self.root / CA_CERT

    @property
    def cert(self) -> Path:
        """The SuperLink's server certificate."""
        return self.root / SUPERLINK_CERT

    @property
    def key(self) -> Path:
        """The SuperLink's private key."""
        return self.root / SUPERLINK_KEY


def _write_bundle(root: Path, consortium: Consortium, site: str, ca_pem: bytes) -> Path:
    """Public files an enrolled site joins with: CA, site.json, default policy, README."""
    bundle = root / "sites" / site
    _write_public(bundle / CA_CERT, ca_pem)
    info = {"site": site, "consortium": consortium.name, "superlink": consortium.address}
    _write_public(bundle / SITE_FILE, json.dumps(info, indent=2) + "\n")
    if consortium.budget is not None:
        # The site policy's format (client.state.SitePolicy): a `privacy` section.
        budget = {**consortium.budget, "datasets": {}}
        _write_public(bundle / POLICY_FILE, yaml.safe_dump({"privacy": budget}))
    _write_public(bundle / "README.md", _site_readme(site, consortium))
    return bundle


def legacy_private_keys(output: Path) -> list[Path]:
    """Site private keys that an older `medfed provision` left in the output folder."""
    sites = output / "sites"
    if not sites.is_dir():
        return []
    found = [*sites.glob(f"*/{NODE_KEY}"), *sites.glob(f"*/{STATE_DIR}/{KEY_FILE}")]
    return sorted(found)


def _enrol(
    coord: CoordinatorKit, manifest: dict[str, Any], enrolment: Enrolment, *, source: Path
) -> None:
    """Record a verified enrolment: keys into the kit, the binding into the manifest."""
    site = enrolment.site
    entry = manifest["sites"].get(site, {"status": AWAITING})
    if entry["status"] == "active":
        current = coord.enrolment(site)
        if current.fingerprint == enrolment.fingerprint:
            return  # the same file again
        if enrolment.replaces.get("ledger_key_id") != current.ledger_key_id:
            raise ValueError(
                f"site {site!r} is already enrolled with ledger key {current.ledger_key_id}; "
                "a new enrolment for it must come from `medfed site init --rekey` on the "
                "site's kit (it names the keys it retires)"
            )
        retired = coord.root / LEDGER_KEYS_DIR / f"{site}@{current.ledger_key_id}.pub"
        shutil.copyfile(coord.root / LEDGER_KEYS_DIR / f"{site}.pub", retired)
        entry.setdefault("retired", []).append(
            {"ledger_key_id": current.ledger_key_id, "auth_key": current.node_fingerprint}
        )
    raw = source.read_bytes()
    _write_public(coord.root / ENROLMENTS_DIR / f"{site}.json", raw)
    _write_public(coord.site_key(site), enrolment.supernode_key.encode())
    _write_public(coord.root / LEDGER_KEYS_DIR / f"{site}.pub", enrolment.ledger_key.encode())
    entry.update(
        status="active",
        auth_key=enrolment.node_fingerprint,
        ledger_key_id=enrolment.ledger_key_id,
        fingerprint=enrolment.fingerprint,
        enrolment_sha256=hashlib.sha256(raw).hexdigest(),
        enrolled=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        origin="site-generated keys; proofs of possession verified; fingerprint confirmed "
        "out of band at enrolment",
    )
    manifest["sites"][site] = entry


def provision(
    description: Path,
    output: Path,
    *,
    add_sites: list[str] | None = None,
    enrol: list[tuple[Path, str]] | None = None,
) -> CoordinatorKit:
    """Create or complete the consortium's CA and coordinator kit; enrol sites.

    Args:
        description: The consortium description (YAML).
        output: Folder for `ca/`, `coordinator/` and `sites/`.
        add_sites: Sites to add beyond the description (written back into it); they
            wait for their enrolment.
        enrol: (enrolment file, fingerprint the site read out of band) pairs; each
            site is added to the description if missing.

    Returns:
        The coordinator kit.

    Raises:
        ValueError: The description or an enrolment is invalid, a fingerprint does not
            match, or a revoked site is listed again.
    """
    consortium = load_consortium(description)
    enrolments = []
    for path, fingerprint in enrol or []:
        enrolment = read_enrolment(path)
        enrolment.verify(fingerprint=fingerprint)
        enrolments.append((enrolment, path))
    wanted = [*(add_sites or []), *(e.site for e, _ in enrolments)]
    new = [check_name(s) for s in dict.fromkeys(wanted) if s not in consortium.sites]
    if new:
        raw = yaml.safe_load(description.read_text())
        raw["sites"] = [*raw["sites"], *new]
        description.write_text(yaml.safe_dump(raw, sort_keys=False))
        consortium = load_consortium(description)
    output.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _ensure_ca(output, consortium.name)
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    coord = CoordinatorKit(output / "coordinator")
    coord.root.mkdir(parents=True, exist_ok=True)
    _write_public(coord.ca, ca_pem)
    _ensure_server_cert(coord.root, consortium, ca, ca_key)
    manifest: dict[str, Any] = (
        coord.manifest() if (coord.root / MANIFEST).exists() else {"sites": {}}
    )
    for site in consortium.sites:
        entry = manifest["sites"].setdefault(site, {"status": AWAITING})
        if entry["status"] == "revoked":
            raise ValueError(
                f"site {site!r} was revoked; remove it from {description} or give the "
                "hospital a new name (a revoked key is never re-activated)"
            )
    for enrolment, path in enrolments:
        _enrol(coord, manifest, enrolment, source=path)
        # An older provision made this site's keys here; the site has replaced them.
        for legacy in (output / "sites" / enrolment.site / NODE_KEY,
                       output / "sites" / enrolment.site / STATE_DIR / KEY_FILE):  # fmt: skip
            legacy.unlink(missing_ok=True)
    for site in consortium.sites:
        if manifest["sites"][site]["status"] == "active":
            _write_bundle(output, consortium, site, ca_pem)
    manifest.update(name=consortium.name, superlink=consortium.address)
    coord.save_manifest(manifest)
    _write_public(coord.root / "README.md", _coordinator_readme(consortium))
    return coord


def join_site(kit: Path, bundle: Path) -> SiteKit:
    """Join a site kit (own keys) with the public files the coordinator sent back.

    The site's default policy from the consortium is written only where the site has
    none yet.

    Raises:
        ValueError: The bundle is not for this kit's site, or lacks a file.
    """
    enrolment = read_enrolment(kit / ENROLMENT_FILE)
    info = json.loads((bundle / SITE_FILE).read_text()) if (bundle / SITE_FILE).exists() else {}
    if info.get("site") != enrolment.site:
        raise ValueError(
            f"{bundle} is for site {info.get('site')!r}, but the kit {kit} belongs to "
            f"{enrolment.site!r}; use the folder the coordinator wrote for this site"
        )
    if not (bundle / CA_CERT).is_file():
        raise ValueError(f"{bundle} has no {CA_CERT}; ask the coordinator for the site's folder")
    for name in (CA_CERT, SITE_FILE, "README.md"):
        if (bundle / name).exists():
            _write_public(kit / name, (bundle / name).read_bytes())
    policy = kit / STATE_DIR / POLICY_FILE
    if (bundle / POLICY_FILE).exists() and not policy.exists():
        _write_public(policy, (bundle / POLICY_FILE).read_bytes())
    return SiteKit(kit)


def provision_local(description: Path, output: Path, site_kits: Path) -> CoordinatorKit:
    """Enrol every listed site with every party on one machine (tests, benchmarks).

    Each site makes its own kit under `site_kits/<site>` (as `medfed site init`), is
    enrolled with its fingerprint, and joins.

    Returns:
        The coordinator kit.
    """
    sites = load_consortium(description).sites
    enrol = []
    for site in sites:
        kit = site_kits / site
        enrolment = (
            read_enrolment(kit / ENROLMENT_FILE)
            if (kit / ENROLMENT_FILE).exists()
            else init_site_keys(kit, site)
        )
        enrol.append((kit / ENROLMENT_FILE, enrolment.fingerprint))
    coord = provision(description, output, enrol=enrol)
    for site in sites:
        join_site(site_kits / site, output / "sites" / site)
    return coord


def revoke_site(coordinator: Path, site: str, *, description: Path | None = None) -> Path:
    """Mark a site revoked and drop its public key from the coordinator kit.

    The site is also removed from the consortium `description`, when given.

    Returns:
        The revoked public key, kept as `site-keys/<site>.pub.revoked` so a running
        SuperLink can be told to unregister it.

    Raises:
        ValueError: The site is unknown to the kit.
    """
    kit = CoordinatorKit(coordinator)
    manifest = kit.manifest()
    if site not in manifest["sites"]:
        raise ValueError(
            f"site {site!r} is not in {kit.root / MANIFEST}; known sites: "
            f"{sorted(manifest['sites'])}"
        )
    revoked = kit.site_key(site).with_name(f"{site}.pub.revoked")
    if kit.site_key(site).exists():
        kit.site_key(site).replace(revoked)
    manifest["sites"][site]["status"] = "revoked"
    kit.save_manifest(manifest)
    if description is not None:
        raw = yaml.safe_load(description.read_text())
        raw["sites"] = [
            item
            for item in raw.get("sites") or []
            if (item.get("name") if isinstance(item, dict) else item) != site
        ]
        description.write_text(yaml.safe_dump(raw, sort_keys=False))
    return revoked


def _site_readme(site: str, consortium: Consortium) -> str:
    return f"""# Joining `{site}` to {consortium.name}

These files are public: the consortium CA certificate (`ca.pem`), the coordinator's
address (`site.json`, `{consortium.address}`) and, if the consortium set one, a default
privacy budget (`policy.yaml`). Check the CA's fingerprint with the coordinator, then
join the kit in which `medfed site init` made this site's own keys:

    medfed site join --kit /path/to/site-kit --bundle .
    medfed site check --data /path/to/dicom
    medfed site start --kit /path/to/site-kit --data /path/to/dicom

The site dials out only, with TLS verified against `ca.pem`. Its private keys never
leave its machine.
"""


def _coordinator_readme(consortium: Consortium) -> str:
    return f"""# Coordinator kit ({consortium.name})

Enrol a site from the enrolment file it sent and the fingerprint it read to you by
another channel (it never sends private keys):

    medfed provision consortium.yaml --output .. --enrol enrolment.json --fingerprint FP

then send it `../sites/<site>/`. Start the SuperLink (on loopback) and the Fleet gate
(on the consortium address, the only API the sites reach):

    medfed server start --kit .

Sites connect to `{consortium.address}`. Launch a run from this machine:

    medfed run federation=deploy federation.kit=$PWD rounds=10

`enrolments/` holds each site's signed enrolment (the binding of its name to its keys),
`site-keys/` their SuperNode public keys, `ledger-keys/` the public keys of their
privacy ledgers (`medfed audit verify --keys ledger-keys`, `medfed audit keys --kit .`).
"""
