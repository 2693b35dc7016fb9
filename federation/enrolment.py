"""Site-owned keys: a site makes its keys on its own machine and enrols public keys only.

`medfed site init --name NAME --kit DIR` (on the hospital's machine) writes:

    supernode.key / .pub     SuperNode authentication key pair (EC P-384, OpenSSH, 0600)
    state/site_key.pem/.pub  ledger and audit-log signing key (Ed25519, 0600)
    enrolment.json           public keys only, with proof of possession of both keys

and prints the enrolment's fingerprint. The site sends `enrolment.json` to the coordinator
by any channel and reads the fingerprint to the coordinator by another (phone, signed
letter); `medfed provision ... --enrol enrolment.json --fingerprint FP` checks both
signatures and the fingerprint before it registers the keys. The coordinator never
holds a site's private key; the enrolment file it keeps is the auditor's evidence of
which public key belongs to which site and where that binding came from.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from federation.ledger import KEY_FILE
from federation.security import key_id, load_or_create_signing_key

__all__ = [
    "ENROLMENT_FILE",
    "FORMAT",
    "NODE_KEY",
    "NODE_PUB",
    "Enrolment",
    "check_name",
    "init_site_keys",
    "node_key_fingerprint",
    "read_enrolment",
]

FORMAT = "medfed-enrolment/1"
ENROLMENT_FILE = "enrolment.json"
NODE_KEY = "supernode.key"
NODE_PUB = "supernode.pub"
STATE_DIR = "state"
RETIRED_DIR = "retired"
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def check_name(name: str, what: str = "site name") -> str:
    """`name` if it is a valid site or consortium name.

    Raises:
        ValueError: It is not; the message says what is allowed.
    """
    if not (0 < len(name) <= 63 and name[0].isalnum() and set(name) <= _NAME_CHARS):
        raise ValueError(
            f"{what} {name!r} is not a valid name: use letters, digits, '.', '_' or '-' "
            "(at most 63 characters, starting with a letter or digit)"
        )
    return name


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def node_key_fingerprint(openssh_public: bytes) -> str:
    """Fingerprint of a SuperNode public key: sha256 of its OpenSSH form (no comment)."""
    blob = b" ".join(openssh_public.split()[:2])
    return hashlib.sha256(blob).hexdigest()[:16]


def _normalise(fingerprint: str) -> str:
    return "".join(c for c in fingerprint.lower() if c in "0123456789abcdef")


@dataclass(frozen=True)
class Enrolment:
    """A site's signed enrolment: its name and public keys, with proof of possession."""

    site: str
    created: str
    supernode_key: str  # OpenSSH public key
    ledger_key: str  # PEM (SubjectPublicKeyInfo)
    replaces: dict[str, str] = field(default_factory=dict)  # retired key ids, on re-keying
    proof: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        """What both proofs sign."""
        return {
            "format": FORMAT,
            "site": self.site,
            "created": self.created,
            "supernode_key": self.supernode_key,
            "ledger_key": self.ledger_key,
            "replaces": self.replaces,
        }

    @property
    def fingerprint(self) -> str:
        """What the site reads to the coordinator out of band: sha256 of the body, 16 hex."""
        return hashlib.sha256(_canonical(self.body())).hexdigest()[:16]

    @property
    def ledger_public_key(self) -> Ed25519PublicKey:
        """The site's ledger signing key."""
        key = serialization.load_pem_public_key(self.ledger_key.encode())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"enrolment of {self.site!r}: ledger_key is not an Ed25519 key")
        return key

    @property
    def ledger_key_id(self) -> str:
        """Key id of the ledger key, as ledger entries carry it."""
        return key_id(self.ledger_public_key)

    @property
    def node_fingerprint(self) -> str:
        """Fingerprint of the SuperNode key."""
        return node_key_fingerprint(self.supernode_key.encode())

    def to_json(self) -> str:
        """The enrolment file's text."""
        return json.dumps({**self.body(), "proof": self.proof}, indent=2, sort_keys=True) + "\n"

    def verify(self, *, fingerprint: str | None = None) -> None:
        """Check both proofs of possession and, if given, the out-of-band fingerprint.

        Raises:
            ValueError: A proof does not verify, or the fingerprint differs; the message
                says which.
        """
        message = _canonical(self.body())
        try:
            self.ledger_public_key.verify(base64.b64decode(self.proof.get("ledger", "")), message)
        except (InvalidSignature, ValueError) as err:
            raise ValueError(
                f"enrolment of {self.site!r}: the ledger-key signature does not verify; the "
                "file was altered or not made by `medfed site init`"
            ) from err
        node = serialization.load_ssh_public_key(self.supernode_key.encode())
        if not isinstance(node, ec.EllipticCurvePublicKey):
            raise ValueError(f"enrolment of {self.site!r}: supernode_key is not an EC key")
        try:
            node.verify(
                base64.b64decode(self.proof.get("supernode", "")),
                message,
                ec.ECDSA(hashes.SHA384()),
            )
        except (InvalidSignature, ValueError) as err:
            raise ValueError(
                f"enrolment of {self.site!r}: the SuperNode-key signature does not verify; "
                "the file was altered or not made by `medfed site init`"
            ) from err
        if fingerprint is not None and _normalise(fingerprint) != self.fingerprint:
            raise ValueError(
                f"enrolment of {self.site!r} has fingerprint {self.fingerprint}, not "
                f"{fingerprint!r}: the file is not the one the site made; ask the site to "
                "read its fingerprint again (`medfed site init` printed it)"
            )


def read_enrolment(path: Path) -> Enrolment:
    """Parse an enrolment file (signatures are checked by `Enrolment.verify`).

    Raises:
        ValueError: The file is not an enrolment; the message names what is wrong.
    """
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ValueError(f"enrolment file {path} does not exist") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not an enrolment file (not JSON: {err})") from err
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file; make one with `medfed site init`")
    missing = {"site", "created", "supernode_key", "ledger_key", "proof"} - set(raw)
    if missing:
        raise ValueError(f"{path}: enrolment lacks {sorted(missing)}")
    return Enrolment(
        site=check_name(str(raw["site"])),
        created=str(raw["created"]),
        supernode_key=str(raw["supernode_key"]),
        ledger_key=str(raw["ledger_key"]),
        replaces={str(k): str(v) for k, v in (raw.get("replaces") or {}).items()},
        proof={str(k): str(v) for k, v in raw["proof"].items()},
    )


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _retire(kit: Path) -> dict[str, str]:
    """Move the kit's current keys aside (public halves kept, private ones deleted)."""
    node_pub, ledger_key = kit / NODE_PUB, kit / STATE_DIR / KEY_FILE
    replaces: dict[str, str] = {}
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    retired = kit / RETIRED_DIR / stamp
    retired.mkdir(parents=True, exist_ok=True)
    if node_pub.exists():
        replaces["supernode_key"] = node_key_fingerprint(node_pub.read_bytes())
        shutil.move(node_pub, retired / NODE_PUB)
    if ledger_key.exists():
        pub = ledger_key.with_suffix(".pub")
        signing = load_or_create_signing_key(ledger_key)
        replaces["ledger_key_id"] = key_id(signing.public_key())
        shutil.move(pub, retired / f"site_key@{replaces['ledger_key_id']}.pub")
        ledger_key.unlink()
    (kit / NODE_KEY).unlink(missing_ok=True)
    return replaces


def init_site_keys(kit: Path, site: str, *, rekey: bool = False) -> Enrolment:
    """Create the site's keys in `kit` (on the site's machine) and its enrolment file.

    Args:
        kit: The site's kit folder (created if missing).
        site: The site's name.
        rekey: Retire keys already in the kit (e.g. ones `medfed provision` made at the
            coordinator before sites made their own) and make new ones; the enrolment
            names the retired keys so the ledger's chain can be followed across.

    Raises:
        ValueError: The kit already holds keys and `rekey` is false.
    """
    check_name(site)
    kit.mkdir(parents=True, exist_ok=True)
    existing = [p for p in (kit / NODE_KEY, kit / STATE_DIR / KEY_FILE) if p.exists()]
    replaces: dict[str, str] = {}
    if existing and not rekey:
        raise ValueError(
            f"{kit} already holds keys ({', '.join(p.name for p in existing)}); "
            "`medfed site init --rekey` retires them and makes new ones"
        )
    if existing:
        replaces = _retire(kit)
    node = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        kit / NODE_KEY,
        node.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    node_pub = node.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    (kit / NODE_PUB).write_bytes(node_pub + f" {site}\n".encode())
    ledger = load_or_create_signing_key(kit / STATE_DIR / KEY_FILE)
    ledger_pem = ledger.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    enrolment = Enrolment(
        site=site,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        supernode_key=node_pub.decode(),
        ledger_key=ledger_pem.decode(),
        replaces=replaces,
    )
    message = _canonical(enrolment.body())
    proof = {
        "ledger": base64.b64encode(ledger.sign(message)).decode(),
        "supernode": base64.b64encode(node.sign(message, ec.ECDSA(hashes.SHA384()))).decode(),
    }
    enrolment = dataclasses.replace(enrolment, proof=proof)
    (kit / ENROLMENT_FILE).write_text(enrolment.to_json())
    return enrolment
