"""Site governance: which training plans may run on the site's data, and within what limits.

A training plan is what a run executes at the site: the medfed version, the task, the
model and the privacy parameters (the site config the coordinator sends, minus the round
and run name); `federation.config.plan_hash` names it. The site keeps, in its state folder:

- `plans/<hash>.json`: every plan it was asked to run, for review;
- `audit.jsonl`: its governance audit log, append-only JSON lines, hash-chained and signed
  with the site's Ed25519 key: plans requested, approved (by whom, when) and revoked.
  A plan's status is replayed from this log, so it cannot drift from what was recorded;
- the `governance` section of `policy.yaml`: whether plans need approval, and limits on
  tasks, rounds, local dataset size and DP parameters.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from federation import __version__, keys
from federation.appdigest import release_digest
from federation.config import plan_hash
from federation.files import write_atomically
from federation.signedlog import SignedLog, chain_problems

__all__ = [
    "AUDIT_FILE",
    "PLANS_DIR",
    "AuditLog",
    "GovernancePolicy",
    "PlanRegistry",
    "RunRequest",
    "plan_document",
    "plan_summary",
]

AUDIT_FILE = "audit.jsonl"
PLANS_DIR = "plans"
_VOLATILE = {keys.SERVER_ROUND, keys.RUN_NAME}


@dataclass(frozen=True)
class RunRequest:
    """What the site checks a training request against: the plan and its privacy cost.

    Attributes:
        task: The task's name.
        rounds: Rounds the run will ask for.
        num_train: Training examples of the site's dataset.
        privacy_mode: `dp-sgd`, `central` or `none`.
        noise_multiplier: Noise this site's DP-SGD would use (calibrated when a target
            epsilon is given); None without DP-SGD.
        accountant: The run's privacy accountant.
        run_epsilon: Epsilon the whole run would spend on the dataset at the site's delta
            if every round is trained; None without DP-SGD.
    """

    task: str
    rounds: int
    num_train: int
    privacy_mode: str
    noise_multiplier: float | None
    accountant: str
    run_epsilon: float | None


@dataclass(frozen=True)
class GovernancePolicy:
    """The `governance` section of a site's `policy.yaml`; unset limits do not apply.

    Attributes:
        require_plan_approval: Train only on plans approved with `medfed site plans
            approve`. Off when the section is absent (as for simulated demo sites); a
            hospital turns it on with `medfed site policy --require-plan-approval`.
        allowed_tasks: Task names the site may train.
        max_rounds: Most rounds one run may ask for.
        min_dataset_size: Fewest local training examples the site trains with.
        min_noise_multiplier: Lowest DP-SGD noise multiplier; requires DP-SGD.
        max_epsilon_per_run: Most epsilon one run may spend; requires DP-SGD.
        allowed_accountants: Privacy accountants the site accepts.
        require_evaluation_approval: Evaluate a model in an evaluation-only run
            (`medfed evaluate`) only on an approved plan, which names the model and the
            digest of its weights.
        min_eval_examples: Fewest held-out examples the site releases metrics on.
        allow_model_sharing: The site's own model (FedBN layers, personalised) may be
            sent to the other sites for cross-site validation.
    """

    require_plan_approval: bool = False
    allowed_tasks: tuple[str, ...] | None = None
    max_rounds: int | None = None
    min_dataset_size: int | None = None
    min_noise_multiplier: float | None = None
    max_epsilon_per_run: float | None = None
    allowed_accountants: tuple[str, ...] | None = None
    require_evaluation_approval: bool = False
    min_eval_examples: int | None = None
    allow_model_sharing: bool = False

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "policy") -> GovernancePolicy:
        """Parse and check the section.

        Raises:
            ValueError: Unknown key or invalid value (named).
        """
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(raw) - known):
            raise ValueError(
                f"{source}: unknown governance setting(s) {unknown}; known: {sorted(known)}"
            )
        try:
            policy = cls(
                require_plan_approval=bool(raw.get("require_plan_approval", False)),
                allowed_tasks=_names(raw.get("allowed_tasks")),
                max_rounds=_opt(int, raw.get("max_rounds")),
                min_dataset_size=_opt(int, raw.get("min_dataset_size")),
                min_noise_multiplier=_opt(float, raw.get("min_noise_multiplier")),
                max_epsilon_per_run=_opt(float, raw.get("max_epsilon_per_run")),
                allowed_accountants=_names(raw.get("allowed_accountants")),
                require_evaluation_approval=bool(raw.get("require_evaluation_approval", False)),
                min_eval_examples=_opt(int, raw.get("min_eval_examples")),
                allow_model_sharing=bool(raw.get("allow_model_sharing", False)),
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: invalid governance policy: {err}") from err
        for name in ("max_rounds", "min_noise_multiplier", "max_epsilon_per_run"):
            value = getattr(policy, name)
            if value is not None and value <= 0:
                raise ValueError(f"{source}: governance.{name}={value} must be > 0")
        for name in ("min_dataset_size", "min_eval_examples"):
            value = getattr(policy, name)
            if value is not None and value < 0:
                raise ValueError(f"{source}: governance.{name} must be >= 0")
        return policy

    def to_dict(self) -> dict[str, Any]:
        """The section as written to YAML (unset limits left out)."""
        out: dict[str, Any] = {}
        for name, value in asdict(self).items():
            if value is not None:
                out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def load(cls, path: Path) -> GovernancePolicy:
        """The `governance` section of a policy file (defaults when absent)."""
        if not path.exists():
            return cls()
        raw = yaml.safe_load(path.read_text()) or {}
        section = raw.get("governance") if isinstance(raw, dict) else None
        if section is None:
            return cls()
        if not isinstance(section, dict):
            raise ValueError(f"{path}: 'governance' must be a mapping of settings")
        return cls.from_dict(section, source=str(path))

    def violations(self, request: RunRequest) -> list[str]:
        """Each limit of this policy the request breaks, said with the limit's name."""
        problems: list[str] = []
        if self.allowed_tasks is not None and request.task not in self.allowed_tasks:
            problems.append(
                f"task {request.task!r} is not in the site's allowed_tasks "
                f"{list(self.allowed_tasks)}"
            )
        if self.max_rounds is not None and request.rounds > self.max_rounds:
            problems.append(
                f"the run asks for {request.rounds} rounds, over the site's max_rounds="
                f"{self.max_rounds}"
            )
        if self.min_dataset_size is not None and request.num_train < self.min_dataset_size:
            problems.append(
                f"the local dataset has {request.num_train} training examples, under the "
                f"site's min_dataset_size={self.min_dataset_size}"
            )
        if self.allowed_accountants is not None and (
            request.accountant not in self.allowed_accountants
        ):
            problems.append(
                f"accountant {request.accountant!r} is not in the site's allowed_accountants "
                f"{list(self.allowed_accountants)}"
            )
        dp_limits = [
            n
            for n in ("min_noise_multiplier", "max_epsilon_per_run")
            if getattr(self, n) is not None
        ]
        if dp_limits and request.privacy_mode != "dp-sgd":
            problems.append(
                f"the run trains with privacy.mode={request.privacy_mode!r}, but the site's "
                f"{' and '.join(dp_limits)} require DP-SGD at the site (privacy=dp_sgd)"
            )
            return problems
        noise = request.noise_multiplier
        if self.min_noise_multiplier is not None and noise is not None:
            if noise < self.min_noise_multiplier:
                problems.append(
                    f"noise multiplier {noise:.4g} is below the site's min_noise_multiplier="
                    f"{self.min_noise_multiplier:g}"
                )
        eps = request.run_epsilon
        if self.max_epsilon_per_run is not None and eps is not None:
            if eps > self.max_epsilon_per_run:
                problems.append(
                    f"the run would spend epsilon {eps:.3f} over its {request.rounds} rounds, "
                    f"over the site's max_epsilon_per_run={self.max_epsilon_per_run:g}"
                )
        return problems


_PLAN_ACTIONS = ("requested", "approved", "revoked")


def _opt(kind: type[Any], value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"expected a number, got {value!r}")
    return kind(value)


def _names(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise TypeError(f"expected a list of names, got {value!r}")
    return tuple(str(v) for v in value)


@dataclass
class AuditLog:
    """The site's append-only governance log: hash-chained, each entry signed."""

    path: Path
    key: Ed25519PrivateKey | None
    site: str

    def entries(self) -> list[dict[str, Any]]:
        """All entries, in file order.

        Raises:
            LogFormatError: A line is not an entry (its number is named).
        """
        return SignedLog(self.path, self.key).records()

    def append(self, action: str, *, plan: str, by: str, **details: Any) -> dict[str, Any]:
        """Sign and append one entry (under a file lock); returns it."""
        time = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        return SignedLog(self.path, self.key).append(
            lambda _: {
                "time": time,
                "site": self.site,
                "action": action,
                "plan": plan,
                "by": by,
                "details": details,
            }
        )

    def verify(self, public_key: Ed25519PublicKey) -> list[str]:
        """Problems with the chain or the signatures by `public_key` (empty when intact)."""
        return chain_problems(self.entries(), lambda _: public_key, source=str(self.path))


def plan_document(flat: dict[str, Any], *, app: str | None = None) -> dict[str, Any]:
    """The reviewable content of a plan: its code (app digest) and the config it would run.

    Args:
        flat: The site config the coordinator sends.
        app: Digest of the run's code; the site's own release by default.
    """
    app = app or release_digest() or "unpackaged"
    config = {k: flat[k] for k in sorted(flat) if k not in _VOLATILE}
    return {
        "plan": plan_hash(flat, app=app),
        "medfed": __version__,
        "app": app,
        "config": config,
    }


def plan_summary(document: dict[str, Any]) -> list[str]:
    """Human-readable lines describing a plan: what runs, on which model, with what privacy."""
    cfg = document["config"]
    privacy = str(cfg.get("privacy.mode", "?"))
    if privacy == "dp-sgd":
        noise = (
            f"target epsilon {cfg['privacy.target_epsilon']} over the run"
            if "privacy.target_epsilon" in cfg
            else f"noise multiplier {cfg.get('privacy.noise_multiplier')}"
        )
        privacy = (
            f"DP-SGD at the site: {noise}, clipping norm {cfg.get('privacy.max_grad_norm')}, "
            f"delta {cfg.get('privacy.delta')}, accountant {cfg.get('privacy.accountant')}"
        )
    elif privacy == "central":
        privacy = f"client-level DP at the coordinator ({cfg.get('privacy.clipping')} clipping)"
    elif privacy == "none":
        privacy = "none: the site's update is released without differential privacy"
    lines = [
        f"plan {document['plan']} (medfed {document['medfed']}, "
        f"code: app {str(document.get('app', '?'))[:16]})",
        f"  task: {cfg.get('task.name')} at {cfg.get('task.image_size')} px, "
        f"{cfg.get('task.local_epochs')} local epoch(s), batch {cfg.get('task.batch_size')}, "
        f"lr {cfg.get('task.lr')}",
        f"  model: {cfg.get('model.name')} channels {cfg.get('model.channels')}, "
        f"norm {cfg.get('model.norm')}",
        f"  rounds: {cfg.get(keys.ROUNDS)}",
        f"  privacy: {privacy}",
        f"  secure aggregation: {cfg.get(keys.SECURE_AGGREGATION) or 'none'}",
    ]
    if cfg.get("model.init"):
        lines.insert(3, f"  started from: {cfg['model.init']}")
    if cfg.get("model.freeze"):
        lines.insert(3, f"  frozen: {cfg['model.freeze']}")
    if keys.PERSONALISE_EPOCHS in cfg:
        lines.append(
            f"  personalisation: {cfg[keys.PERSONALISE_EPOCHS]} local epoch(s) fine-tuning "
            "the final global model; the result stays at the site"
        )
    if cfg.get(keys.DITTO_LAMBDA):
        lines.append(
            f"  Ditto: a personal model trained beside the global one (lambda "
            f"{cfg[keys.DITTO_LAMBDA]}), twice the DP-SGD steps per round"
        )
    if keys.WEIGHTS_SHA256 in cfg:
        scope = "all labelled data" if cfg.get(keys.ALL_DATA) else "held-out patients"
        lines.append(
            f"  evaluation only of {cfg.get('model.init')} on the site's {scope}: weights "
            f"{keys.WEIGHTS_SHA256} {cfg[keys.WEIGHTS_SHA256]}; nothing trains"
        )
    return lines


@dataclass
class PlanRegistry:
    """Plans a site was asked to run and its decisions on them."""

    root: Path
    site: str
    key: Ed25519PrivateKey

    @property
    def audit(self) -> AuditLog:
        """The site's governance audit log."""
        return AuditLog(self.root / AUDIT_FILE, self.key, self.site)

    def _plan_path(self, plan: str) -> Path:
        return self.root / PLANS_DIR / f"{plan}.json"

    def document(self, plan: str) -> dict[str, Any]:
        """The stored plan.

        Raises:
            ValueError: The site was never asked to run it.
        """
        path = self._plan_path(plan)
        if not path.exists():
            raise ValueError(
                f"plan {plan} was never requested at site {self.site!r}; "
                f"`medfed site plans list --state {self.root}` shows the known plans"
            )
        return dict(json.loads(path.read_text()))

    def statuses(self) -> dict[str, dict[str, Any]]:
        """Each known plan's status (`pending`, `approved`, `revoked`) and last decision."""
        out: dict[str, dict[str, Any]] = {}
        for path in sorted((self.root / PLANS_DIR).glob("*.json")):
            out[path.stem] = {"status": "pending", "by": "", "time": "", "runs": []}
        for entry in self.audit.entries():
            if entry["action"] not in _PLAN_ACTIONS:
                continue  # the same log also records decisions on apps (client.apptrust)
            row = out.setdefault(
                entry["plan"], {"status": "pending", "by": "", "time": "", "runs": []}
            )
            if entry["action"] == "requested":
                row["runs"].append(entry["details"].get("run", ""))
                row.setdefault("requested", entry["time"])
            elif entry["action"] in ("approved", "revoked"):
                row.update(status=entry["action"], by=entry["by"], time=entry["time"])
        return out

    def status(self, plan: str) -> str:
        """`approved`, `revoked`, `pending`, or `unknown` for a plan never requested."""
        return self.statuses().get(plan, {}).get("status", "unknown")

    def resolve(self, prefix: str) -> str:
        """The full hash of a known plan from a unique prefix.

        Raises:
            ValueError: No known plan, or more than one, starts with `prefix`.
        """
        matches = [p for p in self.statuses() if p.startswith(prefix)]
        if len(matches) != 1:
            found = "no known plan" if not matches else f"{len(matches)} plans ({matches})"
            raise ValueError(
                f"{found} at site {self.site!r} starts with {prefix!r}; "
                f"`medfed site plans list --state {self.root}` shows them"
            )
        return matches[0]

    def request(
        self, flat: dict[str, Any], *, run: str, by: str = "coordinator", app: str | None = None
    ) -> str:
        """Keep a plan the coordinator asked to run, pending review; returns its hash.

        `app` is the digest of the run's code (default: the site's own release).
        """
        document = plan_document(flat, app=app)
        plan = str(document["plan"])
        path = self._plan_path(plan)
        if not path.exists():
            write_atomically(path, json.dumps(document, indent=2, sort_keys=True, default=str))
        if run not in self.statuses().get(plan, {}).get("runs", []):
            self.audit.append("requested", plan=plan, by=by, run=run)
        return plan

    def approve(self, plan: str, *, by: str, note: str = "") -> dict[str, Any]:
        """Approve a requested plan; recorded with who and when in the audit log."""
        self.document(plan)
        if not by.strip():
            raise ValueError("an approval must name who approves (--by NAME)")
        return self.audit.append("approved", plan=plan, by=by, note=note)

    def revoke(self, plan: str, *, by: str, reason: str = "") -> dict[str, Any]:
        """Withdraw a plan's approval: later rounds of it are refused."""
        if self.status(plan) != "approved":
            raise ValueError(
                f"plan {plan} is {self.status(plan)} at site {self.site!r}, not approved; "
                "only an approved plan can be revoked"
            )
        if not by.strip():
            raise ValueError("a revocation must name who revokes (--by NAME)")
        return self.audit.append("revoked", plan=plan, by=by, reason=reason)

    def previously_approved(self, plan: str) -> str | None:
        """The most recently approved plan other than `plan`, to compare it with."""
        latest = None
        for entry in self.audit.entries():
            if entry["action"] == "approved" and entry["plan"] != plan:
                latest = str(entry["plan"])
        return latest

    def diff(self, old: str, new: str) -> list[str]:
        """Config keys that differ between two plans, as `key: old -> new` lines."""
        a, b = self.document(old), self.document(new)
        lines = []
        if a["medfed"] != b["medfed"]:
            lines.append(f"medfed version: {a['medfed']} -> {b['medfed']}")
        ca, cb = a["config"], b["config"]
        for name in sorted(set(ca) | set(cb)):
            if ca.get(name) != cb.get(name):
                lines.append(f"{name}: {ca.get(name, '<unset>')!s} -> {cb.get(name, '<unset>')!s}")
        return lines
