"""`medfed site console`: the site's own web console, for its data-protection officer and IT.

Status (coordinator, current run and round, last contact, refusals), training plans
(review, approve, revoke: the same governance layer and signed audit log as `medfed site
plans`), the privacy budget (spend over time, the ledger verified on every load, the
policy's limits) and the data (the last preparation's manifest and quarantine list, with
paths shown only here, at the site).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from markupsafe import Markup

from client.activity import SiteActivity
from client.governance import plan_summary
from client.prepare import prepared_dir
from client.state import SitePolicy, SiteState, site_name, update_governance
from federation import keys
from federation.audit import LEDGER_COLUMNS, ledger_row
from federation.console import (
    Page,
    Users,
    bar_chart,
    create_console,
    csrf_token,
    form,
    line_chart,
    table,
)
from federation.ledger import (
    PUBLIC_KEY_FILE,
    Mechanism,
    projected_epsilon,
    verify_ledger,
)
from federation.privacy import plan_round
from federation.security import load_public_key

__all__ = ["CONSOLE_DIR", "SiteConsole", "create_site_console"]

CONSOLE_DIR = "console"


def _coordinator(state_dir: Path) -> str:
    kit_info = state_dir.resolve().parent / "site.json"
    if not kit_info.is_file():
        return "none: a simulated site (no kit)"
    return str(json.loads(kit_info.read_text()).get("superlink", "?"))


class SiteConsole:
    """The pages and actions of one site's console."""

    def __init__(self, state_dir: Path) -> None:
        """Serve the site whose state folder is `state_dir`."""
        self.state = SiteState(state_dir, site_name(state_dir))
        self.activity = SiteActivity(state_dir)

    # -- pages ---------------------------------------------------------------------------

    def status(self, _: Mapping[str, str]) -> Markup:
        """Coordinator, the current run and round, last contact and recent refusals."""
        recent = self.activity.recent(50)
        last = recent[0] if recent else None
        facts = [
            ("site", self.state.site),
            ("coordinator", _coordinator(self.state.root)),
            ("last contact", last["time"] if last else "never"),
            ("current run", f"{last['run']} (round {last['round']})" if last else "none yet"),
        ]
        refusals = [
            [e["time"], e["run"], e["round"], e["action"], e["refused"]]
            for e in recent
            if e["refused"]
        ][:10]
        answered = [
            [e["time"], e["run"], e["round"], e["action"]] for e in recent if not e["refused"]
        ]
        return Markup(
            "<h1>Status</h1>{}<h2>Recent refusals</h2>{}<h2>Recent answers</h2>{}"
        ).format(
            table(["", ""], facts),
            table(["time", "run", "round", "asked to", "reason"], refusals)
            if refusals
            else Markup("<p>None.</p>"),
            table(["time", "run", "round", "answered"], answered[:15]),
        )

    def plans(self, args: Mapping[str, str]) -> Markup:
        """Every plan with its status; one plan's summary, spend and diff, with the decision."""
        registry = self.state.plans
        statuses = registry.statuses()
        rows = [
            [
                Markup('<a href="/plans?plan={}">{}</a>').format(plan, plan[:16]),
                row["status"],
                row["by"],
                row["time"],
                ", ".join(r for r in row["runs"] if r) or "-",
            ]
            for plan, row in statuses.items()
        ]
        body = Markup("<h1>Training plans</h1>{}").format(
            table(["plan", "status", "decided by", "when", "runs"], rows)
            if rows
            else Markup("<p>No plan was requested yet.</p>")
        )
        chosen = args.get("plan") or next(
            (p for p, r in statuses.items() if r["status"] == "pending"), ""
        )
        if chosen in statuses:
            body += self._plan(chosen, statuses[chosen]["status"])
        return body

    def _plan(self, plan: str, status: str) -> Markup:
        registry = self.state.plans
        document = registry.document(plan)
        previous = registry.previously_approved(plan)
        diff = registry.diff(previous, plan) if previous else []
        compared = (
            Markup("<p>Changes from the last approved plan {}:</p><pre>{}</pre>").format(
                previous[:16], "\n".join(diff) or "none"
            )
            if previous
            else Markup("<p>No other plan was approved here: nothing to compare with.</p>")
        )
        if status == "approved":
            decision = form(
                "/plans/revoke",
                csrf_token(),
                Markup(
                    '<input type="hidden" name="plan" value="{}"><label>Reason '
                    '<input name="reason" size="50"></label> '
                ).format(plan),
                "Revoke",
            )
        else:
            decision = form(
                "/plans/approve",
                csrf_token(),
                Markup(
                    '<input type="hidden" name="plan" value="{}"><label>Note '
                    '<input name="note" size="50"></label> '
                ).format(plan),
                "Approve",
            )
        return Markup(
            '<div class="box" id="plan"><h2>Plan {} <small>({})</small></h2><pre>{}</pre>'
            "<p>Epsilon this run would spend here: <strong>{}</strong></p>{}{}</div>"
        ).format(
            plan[:16],
            status,
            "\n".join(plan_summary(document)),
            self._plan_epsilon(document["config"]),
            compared,
            decision,
        )

    def _plan_epsilon(self, config: Mapping[str, Any]) -> str:
        """The epsilon a plan's DP-SGD rounds would add to this site's latest dataset."""
        if config.get("privacy.mode") != "dp-sgd":
            return "none: the plan does not train with DP-SGD at the site"
        if "privacy.target_epsilon" in config:
            return f"{config['privacy.target_epsilon']} (the plan's target over the run)"
        sizes = self.activity.datasets()
        if not sizes:
            return "known once the site has prepared its data for a run"
        dataset, size = list(sizes.items())[-1]
        sample_rate, steps = plan_round(
            size, int(config.get("task.batch_size", 1)), int(config.get("task.local_epochs", 1))
        )
        mechanism = Mechanism(
            sample_rate=sample_rate,
            noise_multiplier=float(config.get("privacy.noise_multiplier", 1.0)),
            max_grad_norm=float(config.get("privacy.max_grad_norm", 1.0)),
            steps=steps * int(config.get(keys.ROUNDS, 1)),
            delta=self.state.policy().delta,
        )
        before, after = projected_epsilon(
            self.state.ledger.entries(),
            dataset,
            mechanism,
            accountant=str(config.get("privacy.accountant", "rdp")),
        )
        return (
            f"{after - before:.3f} (dataset {dataset}, {size} training examples: "
            f"epsilon {before:.3f} -> {after:.3f})"
        )

    def budget(self, _: Mapping[str, str]) -> Markup:
        """Spend per dataset over time against the budget, the verified ledger, the limits."""
        policy = self.state.policy()
        try:
            entries = self.state.ledger.entries()
            key = load_public_key(self.state.root / PUBLIC_KEY_FILE)
            problems = verify_ledger(entries, {self.state.site: key}, source="the ledger")
        except (ValueError, OSError) as err:
            entries, problems = [], [str(err)]
        if problems:
            verdict = Markup('<p class="bad" id="verified">Ledger NOT verified:</p><pre>{}</pre>')
            verdict = verdict.format("\n".join(problems))
        else:
            verdict = Markup(
                '<p class="ok" id="verified">Ledger verified: {} entries, signatures and chain '
                "intact, every epsilon recomputed.</p>"
            ).format(len(entries))
        series: dict[str, list[float]] = {}
        for entry in entries:
            series.setdefault(entry.dataset[:12], []).append(entry.epsilon)
        spent = [
            [d, f"{epsilon:.3f}", f"{policy.budget_for(d):g}"]
            for d, (epsilon, _) in self.state.spent(entries).items()
        ]
        return Markup("<h1>Privacy budget</h1>{}{}{}<h2>Ledger</h2>{}<h2>Limits</h2>{}{}").format(
            verdict,
            line_chart(series, limit=policy.max_epsilon, y_label="epsilon spent, by round"),
            table(["dataset", "epsilon spent", "budget"], spent),
            table(LEDGER_COLUMNS, [ledger_row(e) for e in entries]),
            table(["limit", "value"], self._limits(policy)),
            self._policy_form(policy),
        )

    def _limits(self, policy: SitePolicy) -> list[list[Any]]:
        rows: list[list[Any]] = [["max epsilon per dataset", policy.max_epsilon]]
        rows += [["delta", policy.delta]]
        rows += [[k.replace("_", " "), v] for k, v in self.state.governance().to_dict().items()]
        return rows

    def _policy_form(self, policy: SitePolicy) -> Markup:
        governance = self.state.governance()
        fields = Markup(
            '<p><label>Max epsilon per dataset <input name="max_epsilon" value="{}"></label></p>'
            '<p><label>Most rounds per run (0: no limit) <input name="max_rounds" value="{}">'
            "</label></p>"
            '<p><label>Lowest noise multiplier (0: no limit) <input name="min_noise_multiplier" '
            'value="{}"></label></p>'
            '<p><label><input type="checkbox" name="require_plan_approval" {}> Train only on '
            "approved plans</label></p>"
        ).format(
            policy.max_epsilon,
            governance.max_rounds or 0,
            governance.min_noise_multiplier or 0,
            "checked" if governance.require_plan_approval else "",
        )
        return form("/budget/policy", csrf_token(), fields, "Save limits")

    def data(self, _: Mapping[str, str]) -> Markup:
        """The last preparation: series, vendors, spacing, labels; the quarantine list."""
        folder = prepared_dir(self.state.root)
        if not (folder / "manifest.json").exists():
            return Markup("<h1>Data</h1><p>The site has not prepared its data yet.</p>")
        manifest = json.loads((folder / "manifest.json").read_text())
        quarantine = json.loads((folder / "quarantine.json").read_text())
        vendors = Counter(e["manufacturer"] for e in manifest)
        labels = Counter(e["class_label"] or e["label"] for e in manifest)
        spacing = Counter(" x ".join(f"{s:g}" for s in e["spacing"]) for e in manifest)
        reasons = Counter(p["reason"].split(":")[0] for p in quarantine)
        return Markup(
            "<h1>Data</h1><p>{} series of {} patients ready; {} files quarantined.</p>{}{}{}"
            "<h2>Quarantine</h2>{}{}"
        ).format(
            len(manifest),
            len({e["patient"] for e in manifest}),
            len(quarantine),
            bar_chart(dict(vendors), label="series by vendor"),
            bar_chart(dict(labels), label="series by label"),
            table(["spacing (mm)", "series"], spacing.most_common()),
            table(["reason", "files"], reasons.most_common()),
            table(["file", "reason"], [[p["path"], p["reason"]] for p in quarantine]),
        )

    # -- actions -------------------------------------------------------------------------

    def approve(self, fields: Mapping[str, str], user: str) -> str:
        """Approve a plan as the signed-in user (a signed audit-log entry)."""
        registry = self.state.plans
        plan = registry.resolve(fields.get("plan", ""))
        registry.approve(plan, by=user, note=fields.get("note", ""))
        return f"/plans?plan={plan}"

    def revoke(self, fields: Mapping[str, str], user: str) -> str:
        """Revoke a plan's approval as the signed-in user."""
        registry = self.state.plans
        plan = registry.resolve(fields.get("plan", ""))
        registry.revoke(plan, by=user, reason=fields.get("reason", ""))
        return f"/plans?plan={plan}"

    def save_policy(self, fields: Mapping[str, str], _: str) -> str:
        """Change the budget and the governance limits the form carries."""
        try:
            max_epsilon = float(fields.get("max_epsilon", ""))
            max_rounds = int(fields.get("max_rounds", "0") or 0)
            min_noise = float(fields.get("min_noise_multiplier", "0") or 0)
        except ValueError as err:
            raise ValueError(f"a limit is not a number: {err}") from err
        policy = self.state.policy()
        SitePolicy(max_epsilon, policy.delta, policy.datasets).save(self.state.policy_path)
        update_governance(
            self.state.policy_path,
            {
                "max_rounds": max_rounds,
                "min_noise_multiplier": min_noise,
                "require_plan_approval": "require_plan_approval" in fields,
            },
        )
        return "/budget"


def create_site_console(state_dir: Path) -> tuple[Any, str | None]:
    """The site's console app, and the admin's one-time password on its first start.

    Raises:
        SiteRefusal: The folder is not a site's state (no policy).
    """
    console = SiteConsole(state_dir)
    console.state.policy()  # a site state folder has a policy: fail early otherwise
    folder = state_dir / CONSOLE_DIR
    password = Users(folder).create_admin()
    app = create_console(
        title=f"medfed site {console.state.site}",
        folder=folder,
        pages=[
            Page("/status", "Status", console.status),
            Page("/plans", "Training plans", console.plans),
            Page("/budget", "Privacy budget", console.budget),
            Page("/data", "Data", console.data),
        ],
        actions={
            "/plans/approve": console.approve,
            "/plans/revoke": console.revoke,
            "/budget/policy": console.save_policy,
        },
    )
    return app, password
