"""The privacy ledger: one signed, hash-chained entry per round a site trained.

A site appends to its own ledger (JSON lines) and sends a copy of each entry with its
reply. Anyone holding the site's public key can check that no entry was removed,
inserted, reordered or edited, and recompute every epsilon from the raw mechanism.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from federation import signedlog
from federation.privacy import MechanismStep, PrivacyHistory
from federation.security import load_or_create_signing_key
from federation.signedlog import GENESIS, LogFormatError, SignedLog

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

EPSILON_RTOL = 1e-6
# A ledger owner's state folder holds these (a site's, or the coordinator's).
LEDGER_FILE = "ledger.jsonl"
KEY_FILE = "site_key.pem"
PUBLIC_KEY_FILE = "site_key.pub"


class LedgerFormatError(LogFormatError):
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

    def record(self) -> dict[str, Any]:
        """The entry as one ledger line holds it (an empty `secure_aggregation` left out)."""
        data = asdict(self)
        if not data["secure_aggregation"]:
            data.pop("secure_aggregation")
        return data

    def body(self) -> dict[str, Any]:
        """Everything the hash covers (all but `hash` and `signature`)."""
        data = self.record()
        data.pop("hash")
        data.pop("signature")
        return data

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of the body."""
        return signedlog.digest(self.body())

    def to_json(self) -> str:
        """One line of the ledger file."""
        return json.dumps(self.record(), sort_keys=True)

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> LedgerEntry:
        """The entry of one parsed ledger line.

        Raises:
            LedgerFormatError: The record is not a complete entry.
        """
        try:
            return cls(**{**data, "mechanism": Mechanism(**data["mechanism"])})
        except (TypeError, KeyError) as err:
            raise LedgerFormatError(f"not a ledger entry: {err}") from err

    @classmethod
    def from_json(cls, text: str) -> LedgerEntry:
        """Parse one ledger line.

        Raises:
            LedgerFormatError: The line is not a complete entry.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise LedgerFormatError(f"not a ledger entry: {err}") from err
        return cls.from_record(data)

    def signed(self, key: Ed25519PrivateKey) -> LedgerEntry:
        """This entry with its hash and the site's signature over it."""
        return LedgerEntry.from_record(signedlog.seal(self.body(), key))


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
    try:
        records = signedlog.read_records(path)
    except LogFormatError as err:
        raise LedgerFormatError(str(err)) from err
    entries = []
    for number, record in enumerate(records, start=1):
        try:
            entries.append(LedgerEntry.from_record(record))
        except LedgerFormatError as err:
            raise LedgerFormatError(f"{path}: entry {number}: {err}") from err
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
        return read_ledger(self.path)

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

        def body(records: list[dict[str, Any]]) -> dict[str, Any]:
            entries = [LedgerEntry.from_record(r) for r in records]
            _, epsilon = projected_epsilon(entries, dataset, mechanism, accountant=accountant)
            if epsilon > budget:
                raise BudgetExceeded(
                    f"dataset {dataset} would reach epsilon {epsilon:.3f}, over its budget "
                    f"of {budget:g}; the update must not be released"
                )
            fields = {
                "site": self.site,
                "run": run,
                "round": server_round,
                "dataset": dataset,
                "plan": plan,
                "mechanism": asdict(mechanism),
                "accountant": accountant,
                "epsilon": epsilon,
                "budget": budget,
                "grad_sample_mode": grad_sample_mode,
                "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            }
            return fields | (
                {"secure_aggregation": secure_aggregation} if secure_aggregation else {}
            )

        return LedgerEntry.from_record(SignedLog(self.path, self.key).append(body))


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
    problems = signedlog.chain_problems(
        [entry.record() for entry in entries],
        signedlog.site_keys(keys),
        source=source,
        describe=lambda record: f"run {record['run']!r}, round {record['round']}",
    )
    for position, entry in enumerate(entries):
        where = f"{source}: entry {position} (run {entry.run!r}, round {entry.round})"
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
