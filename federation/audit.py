"""The auditor's view: verify site ledgers, recompute epsilon, write a report."""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from federation.ledger import (
    PUBLIC_KEY_FILE,
    LedgerEntry,
    LedgerFormatError,
    read_ledger,
    verify_ledger,
)
from federation.provision import LEDGER_KEYS_DIR, CoordinatorKit
from federation.security import load_public_key

__all__ = [
    "LEDGER_COLUMNS",
    "LedgerAudit",
    "audit_ledgers",
    "key_bindings",
    "ledger_row",
    "load_keys",
    "write_report",
]


def key_bindings(coordinator: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Which public keys belong to which site, where each binding came from, and problems.

    Each enrolled site's binding is its signed enrolment file in the coordinator kit: the
    site proved possession of both private keys, and the coordinator recorded the
    fingerprint the site confirmed out of band. Every key file the kit registers or
    audits with is checked against it.
    """
    kit = CoordinatorKit(coordinator)
    rows, problems = [], []
    for site, entry in kit.manifest()["sites"].items():
        row = {
            "site": site,
            "status": entry["status"],
            **{k: entry.get(k, "-") for k in ("ledger_key_id", "auth_key", "fingerprint")},
            "enrolled": entry.get("enrolled", "-"),
            "origin": entry.get("origin", "no enrolment yet"),
            "retired": entry.get("retired", []),
        }
        rows.append(row)
        if entry["status"] == "awaiting-enrolment":
            continue
        try:
            enrolment = kit.enrolment(site)
            enrolment.verify(fingerprint=str(entry.get("fingerprint", "")))
        except ValueError as err:
            problems.append(f"{site}: {err}")
            continue
        ledger_pub = kit.root / LEDGER_KEYS_DIR / f"{site}.pub"
        if ledger_pub.exists() and ledger_pub.read_text() != enrolment.ledger_key:
            problems.append(f"{site}: {ledger_pub} is not the ledger key the site enrolled")
        site_pub = kit.site_key(site)
        registered = site_pub.read_text() if site_pub.exists() else enrolment.supernode_key
        if entry["status"] == "active" and registered != enrolment.supernode_key:
            problems.append(f"{site}: {site_pub} is not the SuperNode key the site enrolled")
        if entry.get("ledger_key_id") != enrolment.ledger_key_id:
            problems.append(f"{site}: the manifest names another ledger key than the enrolment")
    return rows, problems


def load_keys(paths: list[Path]) -> dict[str, Ed25519PublicKey]:
    """Public keys by site name from files and folders.

    `NAME.pub` is site NAME's key; a `site_key.pub` belongs to the site whose state
    folder holds it; `NAME@KEYID.pub` is a key site NAME retired when it re-keyed
    (`medfed site init --rekey`), for the entries it signed before. Folders are
    searched recursively.

    Raises:
        ValueError: A path does not exist, or two keys claim the same site.
    """
    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        if not path.exists():
            raise ValueError(f"key path {path} does not exist")
        files = sorted(path.rglob("*.pub")) if path.is_dir() else [path]
        for file in files:
            site = file.parent.name if file.name == PUBLIC_KEY_FILE else file.stem
            if site in keys:
                raise ValueError(f"two public keys for site {site!r} (second: {file})")
            keys[site] = load_public_key(file)
    return keys


@dataclass
class LedgerAudit:
    """The outcome of auditing one ledger file."""

    path: str
    entries: list[LedgerEntry] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return not self.problems

    def summary(self) -> dict[str, Any]:
        """Machine-readable result, with the latest epsilon per site and dataset."""
        latest: dict[str, dict[str, Any]] = {}
        for e in self.entries:
            latest[f"{e.site}/{e.dataset}"] = {
                "site": e.site,
                "dataset": e.dataset,
                "epsilon": e.epsilon,
                "delta": e.mechanism.delta,
                "budget": e.budget,
                "accountant": e.accountant,
                "rounds": sum(1 for x in self.entries if x.dataset == e.dataset),
            }
        return {
            "path": self.path,
            "verified": self.ok,
            "problems": self.problems,
            "spend": list(latest.values()),
            "entries": [asdict(e) for e in self.entries],
        }


def audit_ledgers(paths: list[Path], keys: dict[str, Ed25519PublicKey]) -> list[LedgerAudit]:
    """Read and verify each ledger file."""
    audits = []
    for path in paths:
        audit = LedgerAudit(str(path))
        try:
            audit.entries = read_ledger(path)
        except (LedgerFormatError, OSError) as err:
            audit.problems.append(str(err))
        else:
            if not audit.entries:
                audit.problems.append(f"{path}: the ledger is empty")
            audit.problems += verify_ledger(audit.entries, keys, source=str(path))
        audits.append(audit)
    return audits


def _plot(audit: LedgerAudit) -> str:
    """Epsilon over the ledger's entries against the budget, as an embeddable PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    for dataset in sorted({e.dataset for e in audit.entries}):
        rows = [e for e in audit.entries if e.dataset == dataset]
        ax.plot([e.index for e in rows], [e.epsilon for e in rows], "o-", label=dataset)
        if rows[-1].budget != float("inf"):
            ax.axhline(
                rows[-1].budget, linestyle="--", color="red", linewidth=1, label=f"budget {dataset}"
            )
    ax.set(xlabel="ledger entry (one per trained round)", ylabel="cumulative epsilon")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


# The ledger's columns as the auditor's report and the site console show them.
LEDGER_COLUMNS = (
    "index",
    "run",
    "round",
    "dataset",
    "noise",
    "sample rate",
    "steps",
    "clip",
    "delta",
    "accountant",
    "epsilon",
    "budget",
    "grad mode",
    "time",
)


def ledger_row(e: LedgerEntry) -> list[str]:
    """One ledger entry as the cells of `LEDGER_COLUMNS`."""
    m = e.mechanism
    return [
        str(e.index),
        e.run,
        str(e.round),
        e.dataset,
        f"{m.noise_multiplier:.4f}",
        f"{m.sample_rate:.5f}",
        str(m.steps),
        f"{m.max_grad_norm:g}",
        f"{m.delta:g}",
        e.accountant,
        f"{e.epsilon:.4f}",
        f"{e.budget:g}",
        e.grad_sample_mode,
        e.time,
    ]


def write_report(audits: list[LedgerAudit], output: Path) -> tuple[Path, Path]:
    """Write `privacy_report.html` (self-contained, with plots) and `privacy_report.json`."""
    output.mkdir(parents=True, exist_ok=True)
    overview = "".join(
        f"<tr><td>{html.escape(s['site'])}</td><td>{html.escape(s['dataset'])}</td>"
        f"<td>{s['rounds']}</td><td>{s['epsilon']:.4f}</td><td>{s['delta']:g}</td>"
        f"<td>{s['budget']:g}</td><td>{s['accountant']}</td>"
        f'<td class="{"ok" if a.ok else "bad"}">{"verified" if a.ok else "NOT verified"}</td></tr>'
        for a in audits
        for s in a.summary()["spend"]
    )
    sections = [
        "<section><h2>Overview</h2><table><tr><th>site</th><th>dataset</th><th>rounds</th>"
        "<th>epsilon</th><th>delta</th><th>budget</th><th>accountant</th><th>status</th></tr>"
        f"{overview}</table></section>"
    ]
    for audit in audits:
        status = (
            '<p class="ok">verified: signatures, chain and every epsilon check out</p>'
            if audit.ok
            else '<p class="bad">NOT verified:</p><ul>'
            + "".join(f"<li>{html.escape(p)}</li>" for p in audit.problems)
            + "</ul>"
        )
        sites = ", ".join(sorted({e.site for e in audit.entries})) or "unknown site"
        body = [
            f"<h2>{html.escape(sites)}</h2><p><code>{html.escape(audit.path)}</code></p>",
            status,
        ]
        if audit.entries:
            body.append(
                f'<img alt="epsilon over rounds" src="data:image/png;base64,{_plot(audit)}">'
            )
            head = "".join(f"<th>{c}</th>" for c in LEDGER_COLUMNS)
            rows = "".join(
                "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in ledger_row(e)) + "</tr>"
                for e in audit.entries
            )
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
        sections.append("<section>" + "".join(body) + "</section>")
    page = (
        '<!doctype html><html><head><meta charset="utf-8"><title>medfed privacy report</title>'
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;"
        "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}.ok{color:#060}"
        ".bad{color:#b00;font-weight:bold}section{margin-bottom:2em}</style></head><body>"
        "<h1>medfed privacy report</h1><p>Each site's ledger: one signed entry per round it "
        "trained. Epsilon is recomputed from the raw mechanism of every entry; the dashed "
        "line is the site's budget.</p>" + "".join(sections) + "</body></html>"
    )
    html_path = output / "privacy_report.html"
    json_path = output / "privacy_report.json"
    html_path.write_text(page)
    json_path.write_text(json.dumps([a.summary() for a in audits], indent=2))
    return html_path, json_path
