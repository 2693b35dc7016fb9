"""The privacy ledger: one signed, hash-chained entry per round a site trained.

A site appends to its own ledger (JSON lines) and sends a copy of each entry with its
reply. Anyone holding the site's public key can check that no entry was removed,
inserted, reordered or edited, and recompute every epsilon from the raw mechanism.
"""

from __future__ import annotations

import base64
import datetime as dt
import fcntl
import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from federation.privacy import MechanismStep, PrivacyHistory
from federation.security import key_id, load_or_create_signing_key

__all__ = [
    "GENESIS",
    "BudgetExceeded",
    "Ledger",
    "LedgerEntry",
    "LedgerFormatError",
    "Mechanism",
    "history_of",
    "open_ledger",
    "projected_epsilon",
    "read_ledger",
    "verify_ledger",
]

GENESIS = "0" * 64
EPSILON_RTOL = 1e-6
# A ledger owner's state folder holds these (a site's, or the coordinator's).
LEDGER_FILE = "ledger.jsonl"
KEY_FILE = "site_key.pem"
PUBLIC_KEY_FILE = "site_key.pub"


class LedgerFormatError(ValueError):
    """A ledger file cannot be parsed."""


class BudgetExceeded(ValueError):
    """Appending the entry would take a dataset over its budget; nothing was written."""


@dataclass(frozen=True)
class Mechanism:
    """The subsampled Gaussian mechanism of one round: enough to recompute epsilon."""

    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    steps: int
    delta: float


@dataclass(frozen=True)
class LedgerEntry:
    """One round a site trained, as it signed it."""

    index: int
    site: str
    run: str
    round: int
    dataset: str
    plan: str
    mechanism: Mechanism
    accountant: str
    epsilon: float
    budget: float
    grad_sample_mode: str
    time: str
    prev_hash: str
    key_id: str
    hash: str = ""
    signature: str = ""
    # Secure aggregation protocol the update was released under ("secaggplus"); "" for
    # none. Left out of the hashed body when empty, so entries written before this field
    # existed keep their hash and signature.
    secure_aggregation: str = ""

    def body(self) -> dict[str, Any]:
        """Everything the hash covers (all but `hash` and `signature`)."""
        data = asdict(self)
        data.pop("hash")
        data.pop("signature")
        if not data["secure_aggregation"]:
            data.pop("secure_aggregation")
        return data

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of the body."""
        canonical = json.dumps(self.body(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_json(self) -> str:
        """One line of the ledger file (an empty `secure_aggregation` is left out)."""
        data = asdict(self)
        if not data["secure_aggregation"]:
            data.pop("secure_aggregation")
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LedgerEntry:
        """Parse one ledger line.

        Raises:
            LedgerFormatError: The line is not a complete entry.
        """
        try:
            data = json.loads(text)
            data["mechanism"] = Mechanism(**data["mechanism"])
            return cls(**data)
        except (json.JSONDecodeError, TypeError, KeyError) as err:
            raise LedgerFormatError(f"not a ledger entry: {err}") from err

    def signed(self, key: Ed25519PrivateKey) -> LedgerEntry:
        """This entry with its hash and the site's signature over it."""
        digest = self.digest()
        signature = base64.b64encode(key.sign(digest.encode())).decode()
        return replace(self, hash=digest, signature=signature)


def history_of(entries: list[LedgerEntry], dataset: str) -> PrivacyHistory:
    """The DP history of one dataset over the given entries."""
    history = PrivacyHistory()
    for entry in entries:
        if entry.dataset == dataset:
            m = entry.mechanism
            history.extend([MechanismStep(m.noise_multiplier, m.sample_rate, m.steps)])
    return history


def projected_epsilon(
    entries: list[LedgerEntry], dataset: str, mechanism: Mechanism, *, accountant: str
) -> tuple[float, float]:
    """A dataset's epsilon over `entries`, and what it would be after `mechanism` runs.

    Both at the mechanism's delta; the one budget projection the site's pre-round check
    and the ledger's locked append share.
    """
    history = history_of(entries, dataset)
    before = history.epsilon(delta=mechanism.delta, accountant=accountant)
    history.extend(
        [MechanismStep(mechanism.noise_multiplier, mechanism.sample_rate, mechanism.steps)]
    )
    return before, history.epsilon(delta=mechanism.delta, accountant=accountant)


def read_ledger(path: Path) -> list[LedgerEntry]:
    """All entries of a ledger file, in file order.

    Raises:
        LedgerFormatError: A line is not an entry (its line number is named).
    """
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(LedgerEntry.from_json(line))
        except LedgerFormatError as err:
            raise LedgerFormatError(f"{path}:{number}: {err}") from err
    return entries


def latest_entries(ledger_dir: Path) -> dict[str, LedgerEntry]:
    """Each owner's newest entry among the ledger copies (`<owner>.jsonl`) in a folder."""
    latest = {}
    for path in sorted(ledger_dir.glob("*.jsonl")):
        if entries := read_ledger(path):
            latest[path.stem] = entries[-1]
    return latest


@dataclass
class Ledger:
    """A site's own append-only ledger file, signed with the site's key."""

    path: Path
    key: Ed25519PrivateKey
    site: str

    def entries(self) -> list[LedgerEntry]:
        """Entries on disk (re-read on each call, so restarts never lose spend)."""
        return read_ledger(self.path) if self.path.exists() else []

    def find(self, run: str, server_round: int) -> LedgerEntry | None:
        """The entry of a run's round, if this site already trained it."""
        for entry in self.entries():
            if (entry.run, entry.round) == (run, server_round):
                return entry
        return None

    def append(
        self,
        *,
        run: str,
        server_round: int,
        dataset: str,
        plan: str,
        mechanism: Mechanism,
        accountant: str,
        budget: float,
        grad_sample_mode: str,
        secure_aggregation: str = "",
    ) -> LedgerEntry:
        """Sign and append the entry of a trained round; returns it.

        The budget is checked again under the file lock, so two processes training the
        same dataset can never together overspend: the update of the round that would
        cross it must then not be released.

        Raises:
            BudgetExceeded: The dataset's epsilon after this entry would exceed `budget`.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            entries = self.entries()
            _, epsilon = projected_epsilon(entries, dataset, mechanism, accountant=accountant)
            if epsilon > budget:
                raise BudgetExceeded(
                    f"dataset {dataset} would reach epsilon {epsilon:.3f}, over its budget "
                    f"of {budget:g}; the update must not be released"
                )
            entry = LedgerEntry(
                index=len(entries),
                site=self.site,
                run=run,
                round=server_round,
                dataset=dataset,
                plan=plan,
                mechanism=mechanism,
                accountant=accountant,
                epsilon=epsilon,
                budget=budget,
                grad_sample_mode=grad_sample_mode,
                time=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                prev_hash=entries[-1].hash if entries else GENESIS,
                key_id=key_id(self.key.public_key()),
                secure_aggregation=secure_aggregation,
            ).signed(self.key)
            handle.write(entry.to_json() + "\n")
            handle.flush()
        return entry


def open_ledger(state_dir: Path, owner: str) -> Ledger:
    """The ledger in an owner's state folder, signed with the key kept there."""
    return Ledger(state_dir / LEDGER_FILE, load_or_create_signing_key(state_dir / KEY_FILE), owner)


def verify_ledger(
    entries: list[LedgerEntry], keys: dict[str, Ed25519PublicKey], *, source: str = "ledger"
) -> list[str]:
    """Check signatures, the chain and every epsilon; returns the problems found.

    Args:
        entries: A site's ledger, in file order.
        keys: Public key of each site, by site name; keys a site retired, by
            `SITE@KEYID`.
        source: Name used in the messages (e.g. the file path).
    """
    problems: list[str] = []
    prev = GENESIS
    for position, entry in enumerate(entries):
        where = f"{source}: entry {position} (run {entry.run!r}, round {entry.round})"
        if entry.index != position:
            problems.append(
                f"{where}: index {entry.index} at position {position}: "
                "entries were removed, inserted or reordered"
            )
        if entry.prev_hash != prev:
            problems.append(
                f"{where}: previous-hash link broken: entries were removed, inserted or reordered"
            )
        prev = entry.hash
        if entry.digest() != entry.hash:
            problems.append(f"{where}: content does not match its hash: the entry was edited")
        # A key the site retired when it re-keyed is named `SITE@KEYID` (federation.audit).
        key = keys.get(f"{entry.site}@{entry.key_id}") or keys.get(entry.site)
        if key is None:
            problems.append(f"{where}: no public key for site {entry.site!r}")
        else:
            try:
                key.verify(base64.b64decode(entry.signature), entry.hash.encode())
            except (InvalidSignature, ValueError):
                problems.append(
                    f"{where}: signature is not by site {entry.site!r}'s key "
                    f"(entry claims key {entry.key_id}, site key is {key_id(key)})"
                )
        try:
            recomputed = history_of(entries[: position + 1], entry.dataset).epsilon(
                delta=entry.mechanism.delta, accountant=entry.accountant
            )
        except ValueError as err:
            problems.append(f"{where}: epsilon cannot be recomputed: {err}")
            continue
        if not math.isclose(recomputed, entry.epsilon, rel_tol=EPSILON_RTOL):
            problems.append(
                f"{where}: claims epsilon {entry.epsilon!r}, the mechanism gives {recomputed!r}"
            )
    return problems
