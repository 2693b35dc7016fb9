"""Consortium provisioning: CA, SuperLink certificate, per-site keys and startup kits.

A consortium description (YAML) names the coordinator's address and the sites:

    name: lung-consortium
    coordinator:
      address: coordinator.example.org:9092   # host:port the sites dial (outbound only)
      san: [localhost, 127.0.0.1]              # extra names/IPs for the certificate
    budget: {max_epsilon: 10.0, delta: 1.0e-5} # optional default site policy
    sites: [site-1, site-2, {name: site-3}]

`provision` writes, under one output folder:

    ca/               consortium CA certificate and its private key (stays here)
    coordinator/      coordinator kit: CA, SuperLink certificate and key, the sites'
                      SuperNode public keys and ledger public keys, manifest, README
    sites/<name>/     site kit: CA, SuperNode auth key pair (EC P-384, OpenSSH, as
                      Flower expects), state/ with the ledger signing key (and policy),
                      site.json, README with the start command

Re-running is idempotent: nothing existing is re-keyed; sites missing from the kits are
added without touching the others. Revoking a site marks it in the manifest and
removes its public key from the coordinator kit; `server.deploy` unregisters it from a
running SuperLink. Private keys are created with mode 0600 and never copied.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.ledger import KEY_FILE
from federation.security import load_or_create_signing_key

__all__ = [
    "CA_CERT",
    "MANIFEST",
    "Consortium",
    "CoordinatorKit",
    "SiteKit",
    "load_consortium",
    "provision",
    "revoke_site",
]

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SUPERLINK_CERT = "superlink.pem"
SUPERLINK_KEY = "superlink.key"
NODE_KEY = "supernode.key"
NODE_PUB = "supernode.pub"
SITE_FILE = "site.json"
MANIFEST = "consortium.json"
SITE_KEYS_DIR = "site-keys"
LEDGER_KEYS_DIR = "ledger-keys"
STATE_DIR = "state"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
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


def _check_name(name: str, what: str) -> str:
    if not _NAME.match(name):
        raise ValueError(
            f"{what} {name!r} is not a valid name: use letters, digits, '.', '_' or '-' "
            "(at most 63 characters, starting with a letter or digit)"
        )
    return name


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
        sites.append(_check_name(str(name), "site name"))
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
        name=_check_name(str(raw.get("name", "consortium")), "consortium name"),
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
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    tmp.replace(path)


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
    names = [consortium.host, *consortium.san]
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
    """A site's startup kit folder and what it holds."""

    root: Path

    @property
    def name(self) -> str:
        """The site's name."""
        return str(self.info()["site"])

    def info(self) -> dict[str, Any]:
        """Contents of `site.json` (site name, consortium, SuperLink address)."""
        path = self.root / SITE_FILE
        if not path.exists():
            raise ValueError(
                f"{self.root} is not a site kit (no {SITE_FILE}); pass the folder that "
                "`medfed provision` wrote for this site (OUTPUT/sites/NAME)"
            )
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
        """Sites that are provisioned and not revoked, in provisioning order."""
        sites = self.manifest()["sites"]
        return [name for name, s in sites.items() if s["status"] == "active"]

    def site_key(self, site: str) -> Path:
        """A site's SuperNode public key, as registered with the SuperLink."""
        return self.root / SITE_KEYS_DIR / f"{site}.pub"

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


def _ensure_site(
    root: Path, consortium: Consortium, site: str, ca_pem: bytes
) -> tuple[SiteKit, str]:
    """Create what a site kit lacks; returns the kit and its auth-key fingerprint."""
    kit = SiteKit(root / "sites" / site)
    kit.root.mkdir(parents=True, exist_ok=True)
    if not kit.node_key.exists():
        key = ec.generate_private_key(ec.SECP384R1())
        _write_private(
            kit.node_key,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
        )
    loaded = serialization.load_ssh_private_key(kit.node_key.read_bytes(), password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{kit.node_key} is not an EC key; remove the site's kit to re-key it")
    pub = loaded.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write_public(kit.node_pub, pub + f" {site}\n".encode())
    _write_public(kit.ca, ca_pem)
    load_or_create_signing_key(kit.state / KEY_FILE)  # ledger key, 0600, created once
    if consortium.budget is not None and not (kit.state / "policy.yaml").exists():
        from client.state import POLICY_FILE, SitePolicy

        budget = consortium.budget
        policy = SitePolicy(max_epsilon=budget["max_epsilon"], delta=budget["delta"])
        policy.save(kit.state / POLICY_FILE)
    _write_public(
        kit.root / SITE_FILE,
        json.dumps(
            {"site": site, "consortium": consortium.name, "superlink": consortium.address},
            indent=2,
        )
        + "\n",
    )
    _write_public(kit.root / "README.md", _site_readme(site, consortium))
    digest = hashes.Hash(hashes.SHA256())
    digest.update(pub)
    return kit, digest.finalize().hex()[:16]


def provision(
    description: Path, output: Path, *, add_sites: list[str] | None = None
) -> CoordinatorKit:
    """Create or complete the consortium's CA and kits; idempotent.

    Args:
        description: The consortium description (YAML).
        output: Folder for `ca/`, `coordinator/` and `sites/`.
        add_sites: Sites to add beyond the description (written back into it).

    Returns:
        The coordinator kit.

    Raises:
        ValueError: The description is invalid, or a revoked site is listed again.
    """
    consortium = load_consortium(description)
    if add_sites:
        new = [_check_name(s, "site name") for s in add_sites if s not in consortium.sites]
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
        entry = manifest["sites"].get(site)
        if entry is not None and entry["status"] == "revoked":
            raise ValueError(
                f"site {site!r} was revoked; remove it from {description} or give the "
                "hospital a new name (a revoked key is never re-activated)"
            )
        kit, fingerprint = _ensure_site(output, consortium, site, ca_pem)
        _write_public(coord.site_key(site), kit.node_pub.read_bytes())
        _write_public(
            coord.root / LEDGER_KEYS_DIR / f"{site}.pub",
            (kit.state / KEY_FILE).with_suffix(".pub").read_bytes(),
        )
        manifest["sites"][site] = {"status": "active", "auth_key": fingerprint}
    manifest.update(name=consortium.name, superlink=consortium.address)
    coord.save_manifest(manifest)
    _write_public(coord.root / "README.md", _coordinator_readme(consortium))
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
    return f"""# Startup kit of site `{site}` ({consortium.name})

Keep this folder on the site's machine. `supernode.key` and `state/site_key.pem` are
private (mode 0600): never copy them elsewhere. The site dials the coordinator at
`{consortium.address}` (outbound only, TLS verified against `ca.pem`).

1. Set the site's privacy budget (once; kept across runs):

       medfed site policy --state state --max-epsilon 8 --delta 1e-5

2. Check the DICOM folder, then start the site agent:

       medfed site check --data /path/to/dicom
       medfed site start --kit . --data /path/to/dicom

   `--state DIR` keeps the policy and ledger elsewhere (default: `state/` here).
"""


def _coordinator_readme(consortium: Consortium) -> str:
    return f"""# Coordinator kit ({consortium.name})

Start the SuperLink (TLS, SuperNode authentication; registers the sites' keys):

    medfed server start --kit .

Sites connect to `{consortium.address}`. Launch a run from this machine:

    medfed run federation=deploy federation.kit=$PWD rounds=10

`site-keys/` holds the sites' SuperNode public keys, `ledger-keys/` the public keys
of their privacy ledgers (for `medfed audit verify --keys ledger-keys`).
"""
