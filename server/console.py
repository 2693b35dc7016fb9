"""`medfed server console`: the coordinator's read-only status page.

Sites: enrolled, revoked or awaiting enrolment; online or offline and when last active
(from the SuperLink's own state); the refusals they sent, with their reasons. Runs: how
far each got, and a link to its MLflow run. Behind the same sign-in as the site console.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from markupsafe import Markup

from federation.console import Page, Users, create_console, table
from federation.provision import CoordinatorKit
from server.deploy import node_presence

__all__ = ["create_server_console"]

CONSOLE_DIR = "console"


def _histories(outputs: Path) -> list[dict[str, Any]]:
    found = []
    for path in sorted(outputs.glob("*/history.json"), key=lambda p: p.stat().st_mtime):
        try:
            found.append(json.loads(path.read_text()) | {"_dir": path.parent})
        except (OSError, ValueError):
            continue  # a run being written: shown next time
    return found


class ServerConsole:
    """The coordinator's pages."""

    def __init__(self, kit: Path, *, outputs: Path, tracking_uri: str, mlflow_ui: str) -> None:
        """Describe the consortium of `kit`, and the runs under `outputs`."""
        self.kit = CoordinatorKit(kit)
        self.kit.manifest()  # fail early on a folder that is not a coordinator kit
        self.outputs = outputs
        self.tracking_uri = tracking_uri
        self.mlflow_ui = mlflow_ui.rstrip("/")

    def sites(self, _: Mapping[str, str]) -> Markup:
        """Every site: enrolment, presence, and the refusals it sent."""
        presence = node_presence(self.kit)
        rows = []
        for site, info in self.kit.manifest()["sites"].items():
            seen = presence.get(site)
            rows.append(
                [
                    site,
                    info["status"],
                    "online" if seen and seen["online"] else "offline",
                    (seen or {}).get("last_active") or "never",
                ]
            )
        refusals = [
            [h["run_name"], r["round"], site, reason]
            for h in reversed(_histories(self.outputs))
            for r in reversed(h["rounds"])
            for site, reason in r.get("failures", {}).items()
        ][:30]
        return Markup("<h1>Sites</h1>{}<h2>Refusals the sites sent</h2>{}").format(
            table(["site", "enrolment", "now", "last active"], rows),
            table(["run", "round", "site", "reason"], refusals)
            if refusals
            else Markup("<p>None.</p>"),
        )

    def runs(self, _: Mapping[str, str]) -> Markup:
        """Each run under the outputs folder: progress and its MLflow run."""
        links = self._mlflow_links()
        rows = []
        for h in reversed(_histories(self.outputs)):
            done = (h["_dir"] / "model.medfed.pt").exists()
            link = links.get(h["run_name"])
            rows.append(
                [
                    h["run_name"],
                    "finished" if done else "stopped or running",
                    len(h["rounds"]) - 1,
                    ", ".join(h.get("sites", [])),
                    Markup('<a href="{}">MLflow run</a>').format(link) if link else "-",
                ]
            )
        return Markup("<h1>Runs</h1>{}").format(
            table(["run", "status", "rounds done", "sites", "tracking"], rows)
            if rows
            else Markup("<p>No run yet.</p>")
        )

    def _mlflow_links(self) -> dict[str, str]:
        from mlflow.tracking import MlflowClient

        try:
            client = MlflowClient(self.tracking_uri)
            experiments = [e.experiment_id for e in client.search_experiments()]
            runs = client.search_runs(experiments, max_results=200) if experiments else []
        except Exception:  # no store yet, or unreachable: runs are shown without links
            return {}
        return {
            r.info.run_name: f"{self.mlflow_ui}/#/experiments/{r.info.experiment_id}/runs/"
            f"{r.info.run_id}"
            for r in runs
            if r.info.run_name
        }


def create_server_console(
    kit: Path, *, outputs: Path, tracking_uri: str, mlflow_ui: str = "http://127.0.0.1:5000"
) -> tuple[Any, str | None]:
    """The coordinator's console app, and the admin's one-time password on its first start.

    Raises:
        ValueError: `kit` is not a coordinator kit.
    """
    console = ServerConsole(kit, outputs=outputs, tracking_uri=tracking_uri, mlflow_ui=mlflow_ui)
    folder = kit / CONSOLE_DIR
    password = Users(folder).create_admin()
    app = create_console(
        title=f"medfed coordinator {console.kit.manifest().get('name', '')}".strip(),
        folder=folder,
        pages=[Page("/sites", "Sites", console.sites), Page("/runs", "Runs", console.runs)],
        actions={},
    )
    return app, password
