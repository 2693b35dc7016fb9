"""What a site keeps for itself: its policy, signing key, privacy ledger and last replies.

The state folder belongs to the site, never to the coordinator. Everything that decides
whether the site may still spend privacy is read from disk on each round, so restarting
the site agent never resets its budget.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from client.governance import GovernancePolicy, PlanRegistry
from federation.errors import SiteRefusal
from federation.files import write_atomically
from federation.ledger import (
    Ledger,
    LedgerEntry,
    Mechanism,
    history_of,
    open_ledger,
    projected_epsilon,
)

__all__ = [
    "POLICY_FILE",
    "SitePolicy",
    "SiteState",
    "site_name",
    "update_governance",
    "write_policy_section",
]

POLICY_FILE = "policy.yaml"
LOCAL_LAYERS_DIR = "local-layers"
PERSONAL_DIR = "personal-models"
REPLIES_DIR = "replies"


def write_policy_section(path: Path, section: str, values: dict[str, Any]) -> None:
    """Replace one section of a policy file, keeping the others."""
    raw = yaml.safe_load(path.read_text()) if path.exists() else None
    tree = raw if isinstance(raw, dict) else {}
    tree[section] = values
    write_atomically(path, yaml.safe_dump(tree, sort_keys=False))


def site_name(state_dir: Path) -> str:
    """A site's name: from the kit its state folder sits in, else the folder's name."""
    kit_info = state_dir.resolve().parent / "site.json"
    return str(json.loads(kit_info.read_text())["site"]) if kit_info.is_file() else state_dir.name


def update_governance(path: Path, given: dict[str, Any]) -> GovernancePolicy:
    """Change governance limits in a policy file; 0 or an empty list removes a limit.

    Raises:
        ValueError: A limit is not valid (named).
    """
    current = GovernancePolicy.load(path).to_dict()
    for name, value in given.items():
        if value in (0, [], "") and not isinstance(value, bool):
            current.pop(name, None)
        else:
            current[name] = value
    policy = GovernancePolicy.from_dict(current, source=str(path))
    write_policy_section(path, "governance", policy.to_dict())
    return policy


@dataclass(frozen=True)
class SitePolicy:
    """The site's own limits on privacy spend.

    Attributes:
        max_epsilon: Largest total epsilon any one dataset may reach, over all runs.
        delta: The delta at which the budget is stated (and every round is accounted).
        datasets: Per-dataset overrides of `max_epsilon`, by dataset fingerprint.
    """

    max_epsilon: float
    delta: float
    datasets: dict[str, float] = field(default_factory=dict)

    def budget_for(self, dataset: str) -> float:
        """The epsilon budget of one dataset."""
        return float(self.datasets.get(dataset, self.max_epsilon))

    def save(self, path: Path) -> None:
        """Write the policy as YAML, keeping the file's other sections (governance)."""
        write_policy_section(path, "privacy", asdict(self))

    @classmethod
    def load(cls, path: Path) -> SitePolicy:
        """Read a policy file.

        Raises:
            ValueError: The file is not a valid policy (the problem is named).
        """
        raw = yaml.safe_load(path.read_text()) or {}
        section = raw.get("privacy") if isinstance(raw, dict) else None
        if not isinstance(section, dict):
            raise ValueError(f"{path}: expected a 'privacy' section with max_epsilon and delta")
        try:
            policy = cls(
                max_epsilon=float(section["max_epsilon"]),
                delta=float(section["delta"]),
                datasets={str(k): float(v) for k, v in (section.get("datasets") or {}).items()},
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: invalid privacy policy: {err}") from err
        if not policy.max_epsilon > 0 or not 0 < policy.delta < 1:
            raise ValueError(f"{path}: max_epsilon must be > 0 and delta in (0, 1)")
        return policy


@dataclass
class SiteState:
    """A site's state folder."""

    root: Path
    site: str

    @property
    def policy_path(self) -> Path:
        """Where the site's policy lives."""
        return self.root / POLICY_FILE

    def policy(self) -> SitePolicy:
        """The site's policy.

        Raises:
            SiteRefusal: There is none, or it is invalid.
        """
        if not self.policy_path.exists():
            raise SiteRefusal(
                self.site,
                f"no site policy at {self.policy_path}: the site must set its privacy budget "
                "first (medfed site policy --state DIR --max-epsilon E --delta D)",
            )
        try:
            return SitePolicy.load(self.policy_path)
        except ValueError as err:
            raise SiteRefusal(self.site, str(err)) from err

    def governance(self) -> GovernancePolicy:
        """The governance section of the site's policy (defaults when absent).

        Raises:
            SiteRefusal: The section is invalid.
        """
        try:
            return GovernancePolicy.load(self.policy_path)
        except ValueError as err:
            raise SiteRefusal(self.site, str(err)) from err

    def spent(self, entries: list[LedgerEntry] | None = None) -> dict[str, tuple[float, int]]:
        """Epsilon spent and rounds trained per dataset, at the policy's delta.

        Args:
            entries: The ledger's entries, if already read (the ledger by default).

        Raises:
            SiteRefusal: The site has no valid policy.
        """
        delta = self.policy().delta
        entries = self.ledger.entries() if entries is None else entries
        out = {}
        for dataset in sorted({e.dataset for e in entries}):
            rows = [e for e in entries if e.dataset == dataset]
            epsilon = history_of(entries, dataset).epsilon(
                delta=delta, accountant=rows[-1].accountant
            )
            out[dataset] = (epsilon, len(rows))
        return out

    @property
    def plans(self) -> PlanRegistry:
        """Training plans the site was asked to run, and its decisions on them."""
        return PlanRegistry(self.root, self.site, self.ledger.key)

    @cached_property
    def ledger(self) -> Ledger:
        """The site's signed privacy ledger (its entries are re-read on every use)."""
        return open_ledger(self.root, self.site)

    def check_budget(
        self, *, dataset: str, planned: Mechanism, accountant: str
    ) -> tuple[float, float]:
        """Epsilon this dataset would reach after the planned round, and its budget.

        Raises:
            SiteRefusal: The round would cross the budget, or its delta is not the policy's.
        """
        policy = self.policy()
        if not math.isclose(planned.delta, policy.delta, rel_tol=1e-9):
            raise SiteRefusal(
                self.site,
                f"the run accounts at delta={planned.delta:g} but this site's budget is set at "
                f"delta={policy.delta:g}; ask the coordinator for privacy.delta={policy.delta:g}",
            )
        budget = policy.budget_for(dataset)
        spent, after = projected_epsilon(
            self.ledger.entries(), dataset, planned, accountant=accountant
        )
        if after > budget:
            raise SiteRefusal(
                self.site,
                f"privacy budget: this round would take dataset {dataset} from epsilon "
                f"{spent:.3f} to {after:.3f}, over the site's budget of {budget:g} at "
                f"delta={policy.delta:g}; no training was done",
            )
        return after, budget

    def _run_file(self, folder: str, run: str) -> Path:
        return self.root / folder / f"{hashlib.sha256(run.encode()).hexdigest()[:24]}.pt"

    def _reply_path(self, run: str) -> Path:
        return self._run_file(REPLIES_DIR, run)

    def save_local_layers(self, run: str, state: dict[str, Any]) -> None:
        """Keep the layers this site never shares in a run (FedBN's norm layers)."""
        import torch

        write_atomically(self._run_file(LOCAL_LAYERS_DIR, run), lambda tmp: torch.save(state, tmp))

    def local_layers(self, run: str) -> dict[str, Any] | None:
        """The layers kept by `save_local_layers`, or None before the site's first round."""
        import torch

        path = self._run_file(LOCAL_LAYERS_DIR, run)
        return torch.load(path, weights_only=True) if path.exists() else None

    def save_personal_model(self, run: str, state: dict[str, Any]) -> None:
        """Keep the site's personalised model of a run (it never leaves unless shared)."""
        import torch

        write_atomically(self._run_file(PERSONAL_DIR, run), lambda tmp: torch.save(state, tmp))

    def personal_model(self, run: str) -> dict[str, Any] | None:
        """The model kept by `save_personal_model`, or None."""
        import torch

        path = self._run_file(PERSONAL_DIR, run)
        return torch.load(path, weights_only=True) if path.exists() else None

    def store_reply(self, run: str, entry: LedgerEntry, payload: dict[str, Any]) -> None:
        """Keep the latest reply of a run, so a repeated round is answered without new spend."""
        import torch

        path = self._reply_path(run)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"entry": entry.to_json(), **payload}, path)

    def stored_reply(
        self, run: str, server_round: int
    ) -> tuple[LedgerEntry, dict[str, Any]] | None:
        """The reply already given for this run's round.

        Raises:
            SiteRefusal: The round was trained but its reply is no longer kept; training
                it again would spend privacy twice.
        """
        import torch

        entry = self.ledger.find(run, server_round)
        if entry is None:
            return None
        path = self._reply_path(run)
        if path.exists():
            payload = torch.load(path, weights_only=True)
            stored = LedgerEntry.from_json(payload.pop("entry"))
            if stored.hash == entry.hash:
                return stored, payload
        raise SiteRefusal(
            self.site,
            f"round {server_round} of run {run!r} was already trained and charged "
            f"(ledger entry {entry.index}); its update is no longer kept, and training it "
            "again would spend privacy twice",
        )
