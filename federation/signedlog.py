"""A signed, hash-chained log of JSON records, the privacy ledger's and the audit log's.

Each line of the file is one record (a JSON object). Its `index` is its position, its
`prev_hash` the `hash` of the record before (`GENESIS` for the first), its `key_id` names
the signing key, its `hash` is the SHA-256 of the canonical JSON of every field but `hash`
and `signature`, and its `signature` is the owner's Ed25519 signature over that hash.
Anyone with the owner's public key can tell whether a record was removed, inserted,
reordered or edited.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from federation.security import key_id

__all__ = [
    "GENESIS",
    "LogFormatError",
    "SignedLog",
    "chain_problems",
    "digest",
    "read_records",
    "seal",
    "site_keys",
]

GENESIS = "0" * 64
_SEAL = ("hash", "signature")
KeyFor = Callable[[dict[str, Any]], Ed25519PublicKey | None]


class LogFormatError(ValueError):
    """A line of a signed log is not a record."""


def digest(body: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of a record's body."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def seal(body: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """The body with its hash and the owner's signature over it."""
    hashed = digest(body)
    return {
        **body,
        "hash": hashed,
        "signature": base64.b64encode(key.sign(hashed.encode())).decode(),
    }


def read_records(path: Path) -> list[dict[str, Any]]:
    """All records of a log file in file order (none when the file does not exist).

    Raises:
        LogFormatError: A line is not a JSON object (its line number is named).
    """
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise LogFormatError(f"{path}:{number}: not a log record: {err}") from err
        if not isinstance(record, dict):
            raise LogFormatError(f"{path}:{number}: not a log record: {record!r}")
        records.append(record)
    return records


def site_keys(keys: Mapping[str, Ed25519PublicKey]) -> KeyFor:
    """Look a record's key up by its `site`; a key the site retired, by `SITE@KEYID`."""
    return lambda record: (
        keys.get(f"{record.get('site')}@{record.get('key_id')}")
        or keys.get(str(record.get("site")))
    )


def chain_problems(
    records: list[dict[str, Any]],
    key_for: KeyFor,
    *,
    source: str,
    describe: Callable[[dict[str, Any]], str] | None = None,
) -> list[str]:
    """Check the chain, each hash and each signature; returns the problems found.

    Args:
        records: A log, in file order.
        key_for: The public key that must have signed a record (None: unknown).
        source: Name used in the messages (e.g. the file path).
        describe: What to say of a record after its position (e.g. its run and round).
    """
    problems: list[str] = []
    prev = GENESIS
    for position, record in enumerate(records):
        where = f"{source}: entry {position}" + (f" ({describe(record)})" if describe else "")
        if record.get("index") != position:
            problems.append(
                f"{where}: index {record.get('index')} at position {position}: "
                "entries were removed, inserted or reordered"
            )
        if record.get("prev_hash") != prev:
            problems.append(
                f"{where}: previous-hash link broken: entries were removed, inserted or reordered"
            )
        prev = str(record.get("hash", ""))
        if digest({k: v for k, v in record.items() if k not in _SEAL}) != prev:
            problems.append(f"{where}: content does not match its hash: the entry was edited")
        owner, claimed = record.get("site"), record.get("key_id")
        key = key_for(record)
        if key is None:
            problems.append(f"{where}: no public key for site {owner!r}")
            continue
        try:
            key.verify(base64.b64decode(str(record.get("signature", ""))), prev.encode())
        except (InvalidSignature, ValueError):
            problems.append(
                f"{where}: signature is not by site {owner!r}'s key "
                f"(entry claims key {claimed}, site key is {key_id(key)})"
            )
    return problems


@dataclass
class SignedLog:
    """An owner's append-only log file; `key` is None where the log is only read."""

    path: Path
    key: Ed25519PrivateKey | None

    def records(self) -> list[dict[str, Any]]:
        """Records on disk (re-read on each call)."""
        return read_records(self.path)

    def append(self, build: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> dict[str, Any]:
        """Seal and append the record `build` makes from the records before it.

        The file stays locked from reading to writing, so `build` may check the records
        (e.g. a budget) and raise to append nothing. Returns the sealed record.
        """
        if self.key is None:
            raise ValueError(f"{self.path}: opened without the owner's private key: read only")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            records = self.records()
            body = {
                **build(records),
                "index": len(records),
                "prev_hash": str(records[-1]["hash"]) if records else GENESIS,
                "key_id": key_id(self.key.public_key()),
            }
            record = seal(body, self.key)
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
        return record
