"""Which code may run on the site's data: the site's own medfed release, or apps it approved.

A Flower run ships its code as a FAB (a zip). Before the site's SuperNode creates the
first task of a run, `AppGate.admit` computes the FAB's *app digest* (sha256 over every
file's path and sha256, so it does not depend on how the zip was compressed) and lets
the run in only if the digest is

- the site's installed medfed release (the FAB its own source tree builds to), or
- an app the site approved (`medfed site apps approve DIGEST --by NAME`), not revoked
  since.

Anything else is refused before a line of it runs: the SuperNode answers the message
with an error naming the digest and the FAB hash, and the refusal goes into the site's
signed audit log. Admitted runs are recorded in `<state>/apps/`: the ClientApp puts the
digest into the training-plan hash (so plans and ledger entries name the code), and the
warm SuperExec forks preloaded processes only for the site's own release.

Flower's own check (`flower-supernode --trusted-entities`) verifies publisher signatures
that travel with a FAB; medfed's trust root is the code the site installed itself, which
needs no signer, so it checks digests at the same point instead.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.governance import AUDIT_FILE, AuditLog
from federation.appdigest import app_digest, release_digest
from federation.files import write_atomically
from federation.ledger import KEY_FILE
from federation.security import load_or_create_signing_key

__all__ = [
    "RELEASE",
    "SITE_NAME_ENV",
    "SITE_STATE_ENV",
    "AppGate",
    "UntrustedApp",
    "is_release_fab",
    "running_app",
]

SITE_STATE_ENV = "MEDFED_SITE_STATE"
SITE_NAME_ENV = "MEDFED_SITE_NAME"
RELEASE = "installed medfed release"
_APPS_DIR = "apps"
_APPROVED, _REVOKED, _REFUSED = "app-approved", "app-revoked", "app-refused"


class UntrustedApp(Exception):
    """A run's app is not one the site trusts; the message says which and what to do."""


def _records(state_dir: Path, kind: str) -> Path:
    return state_dir / _APPS_DIR / kind


def running_app(state_dir: Path, run_id: int) -> str:
    """Digest of the code a run executes at this site.

    In deployment the SuperNode recorded it when it admitted the run; in simulation the
    code is this site's own release.
    """
    record = _records(state_dir, "runs") / f"{run_id}.json"
    if record.exists():
        return str(json.loads(record.read_text())["app"])
    return release_digest() or "unpackaged"


def is_release_fab(state_dir: Path, fab_hash: str | None) -> bool:
    """Whether the SuperNode admitted this FAB as the site's own release."""
    if not fab_hash:
        return False
    record = _records(state_dir, "fabs") / f"{fab_hash}.json"
    return record.exists() and json.loads(record.read_text()).get("origin") == RELEASE


@dataclass
class AppGate:
    """The site's decisions on apps, kept in its signed audit log."""

    state_dir: Path
    site: str
    _refused: set[tuple[int, str]] = field(default_factory=set)

    @classmethod
    def from_env(cls) -> AppGate:
        """The gate of the site whose SuperNode this process is (set by `medfed site start`).

        Raises:
            UntrustedApp: The environment does not name the site's state folder.
        """
        state, site = os.environ.get(SITE_STATE_ENV), os.environ.get(SITE_NAME_ENV)
        if not state or not site:
            raise UntrustedApp(
                f"{SITE_STATE_ENV} and {SITE_NAME_ENV} are unset: start the site with "
                "`medfed site start`, which checks every run's app against the site's trust"
            )
        return cls(Path(state), site)

    @functools.cached_property
    def audit(self) -> AuditLog:
        """The site's governance audit log (the same one plan decisions go to)."""
        key = load_or_create_signing_key(self.state_dir / KEY_FILE)
        return AuditLog(self.state_dir / AUDIT_FILE, key, self.site)

    def approved(self) -> dict[str, dict[str, Any]]:
        """Apps approved and not revoked since: digest -> the approving entry."""
        out: dict[str, dict[str, Any]] = {}
        for entry in self.audit.entries():
            app = str(entry.get("details", {}).get("app", ""))
            if entry["action"] == _APPROVED:
                out[app] = entry
            elif entry["action"] == _REVOKED:
                out.pop(app, None)
        return out

    def trusted(self) -> dict[str, str]:
        """Every app digest the site runs, with why it trusts it."""
        out = {d: f"approved by {e['by']} at {e['time']}" for d, e in self.approved().items()}
        if (release := release_digest()) is not None:
            out[release] = RELEASE
        return out

    def resolve(self, prefix: str) -> str:
        """The full digest of an app from its digest or a prefix a refusal named.

        Raises:
            ValueError: Not a digest, or no single app the site saw starts with it.
        """
        prefix = prefix.strip().lower()
        if len(prefix) < 16 or any(c not in "0123456789abcdef" for c in prefix):
            raise ValueError(
                f"{prefix!r} is not an app digest: give at least its first 16 hex digits, "
                "as the refusal named it"
            )
        if len(prefix) == 64:
            return prefix
        seen = {str(e.get("details", {}).get("app", "")) for e in self.audit.entries()}
        matches = sorted(d for d in seen if d.startswith(prefix))
        if len(matches) != 1:
            raise ValueError(
                f"{len(matches)} apps seen at site {self.site!r} start with {prefix}; give "
                "the whole digest (64 hex digits)"
            )
        return matches[0]

    def approve(self, digest: str, *, by: str, note: str = "") -> dict[str, Any]:
        """Trust an app by its digest (as a refusal named it); recorded in the audit log."""
        digest = self.resolve(digest)
        return self.audit.append(_APPROVED, plan="", by=by, app=digest, note=note)

    def revoke(self, digest: str, *, by: str, reason: str = "") -> dict[str, Any]:
        """Stop trusting an approved app; new runs of it are refused.

        Raises:
            ValueError: The app is not approved here.
        """
        digest = self.resolve(digest)
        if digest not in self.approved():
            raise ValueError(
                f"app {digest[:16]} is not approved at site {self.site!r}; "
                f"`medfed site apps list --state {self.state_dir}` shows the approved ones"
            )
        return self.audit.append(_REVOKED, plan="", by=by, app=digest, reason=reason)

    def refusals(self) -> list[dict[str, Any]]:
        """Runs refused for their app, oldest first."""
        return [e for e in self.audit.entries() if e["action"] == _REFUSED]

    def admit(self, fab_content: bytes, fab_hash: str, run_id: int) -> str:
        """Let a run in if its app is trusted; returns its digest.

        Raises:
            UntrustedApp: The app is not trusted; the refusal is in the audit log.
        """
        digest = app_digest(fab_content)
        origin = self.trusted().get(digest)
        if origin is None:
            if (run_id, digest) not in self._refused:  # one audit entry per run
                self._refused.add((run_id, digest))
                self.audit.append(
                    _REFUSED, plan="", by="supernode", app=digest, fab=fab_hash, run=run_id
                )
            raise UntrustedApp(
                f"site {self.site!r} refused run {run_id}: its app {digest} (FAB {fab_hash}) "
                "is neither the site's installed medfed release nor an app it approved; "
                f"nothing of it ran. The site approves it with `medfed site apps approve "
                f"{digest[:16]} --by NAME --state DIR` after reviewing the code"
            )
        body = {"app": digest, "fab": fab_hash, "origin": origin}
        text = json.dumps(body, indent=2, sort_keys=True)
        write_atomically(_records(self.state_dir, "runs") / f"{run_id}.json", text)
        write_atomically(_records(self.state_dir, "fabs") / f"{fab_hash}.json", text)
        return digest
