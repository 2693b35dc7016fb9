"""Launching a run: `medfed run` in Flower's simulation engine."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from collections.abc import Callable
from typing import Any

from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from client.app import create_client_app
from client.site import SimulatedSites
from client.state import POLICY_FILE, SitePolicy
from federation import flowerpatch
from federation.config import MedfedConfig, anchor_paths, resolve_path
from federation.errors import FederationError
from federation.logs import SITE_LOG_ENV, SITE_LOG_FILE, VERBOSE_ENV, context_logger
from server.app import create_server_app
from server.checkpoint import check_run_dir
from server.report import RunResult

__all__ = ["ensure_consortium", "ensure_site_policies", "run_simulation"]


def ensure_consortium(cfg: MedfedConfig) -> None:
    """Generate the synthetic sites that are missing under `data.root`, if allowed."""
    from federation.dicom.synth import generate_consortium

    root = resolve_path(cfg.data.root)
    names = cfg.federation.names()
    missing = [n for n in names if not (root / n).exists()]
    if not missing or not cfg.data.generate:
        return
    log = context_logger()
    log.info("generating synthetic DICOM for %s under %s", ", ".join(missing), root)
    generate_consortium(
        root,
        site_names=names,
        patients_per_site=cfg.data.patients_per_site,
        slices=cfg.data.slices,
        seed=cfg.seed,
        skip_existing=True,
        progress=log.info,
    )


def ensure_site_policies(cfg: MedfedConfig) -> None:
    """Give simulated sites without a policy one with `federation.site_budget`.

    This stands in for each hospital writing its own policy; an existing policy, and the
    spend in the site's ledger, are never touched. The policy written has no
    `governance` section, so simulated (demo) sites train without plan approval; a
    hospital, or a test, turns it on with `medfed site policy --require-plan-approval`.
    """
    for name in cfg.federation.names():
        path = resolve_path(cfg.federation.site_state_root) / name / POLICY_FILE
        if not path.exists():
            SitePolicy(max_epsilon=cfg.federation.site_budget, delta=cfg.privacy.delta).save(path)


def run_simulation(
    cfg: MedfedConfig,
    *,
    client_app_factory: Callable[[SimulatedSites], ClientApp] | None = None,
    wrap_grid: Callable[[Grid], Grid] | None = None,
) -> RunResult:
    """Run the federation in Flower's simulation engine, one virtual SuperNode per site.

    Args:
        cfg: The run configuration.
        client_app_factory: Builds the sites' ClientApp from their identities; the
            medfed site agent by default.
        wrap_grid: Wraps the coordinator's grid (see `create_server_app`).

    Raises:
        FederationError: The run stopped before it finished.

    """
    import torch
    from flwr.simulation import run_simulation as flwr_run_simulation

    # Keep today's Ray behaviour for CPU-only actors without its FutureWarning.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    cfg = anchor_paths(cfg)
    name = cfg.run_name or dt.datetime.now().strftime("medfed-%Y%m%d-%H%M%S")
    cfg = dataclasses.replace(cfg, run_name=name)
    run_dir = resolve_path(cfg.output_dir) / name
    check_run_dir(run_dir, resume=cfg.resume)
    init_args: dict[str, Any] = {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}
    if os.environ.get(VERBOSE_ENV) != "1":
        # The sites' lines go to a file (the summary names it), not between the rounds.
        run_dir.mkdir(parents=True, exist_ok=True)
        os.environ[SITE_LOG_ENV] = str(run_dir / SITE_LOG_FILE)
        init_args["log_to_driver"] = False
    ensure_consortium(cfg)
    ensure_site_policies(cfg)
    names = cfg.federation.names()
    results: list[RunResult] = []
    gpus = 1.0 / len(names) if torch.cuda.is_available() else 0.0
    with flowerpatch.simulation_workers(len(names)):
        flwr_run_simulation(
            server_app=create_server_app(cfg, on_done=results.append, wrap_grid=wrap_grid),
            client_app=(client_app_factory or create_client_app)(
                SimulatedSites(tuple(names), cfg.data.root, cfg.federation.site_state_root)
            ),
            num_supernodes=len(names),
            backend_config={
                "client_resources": {"num_cpus": cfg.federation.cpus_per_site, "num_gpus": gpus},
                "init_args": init_args,
            },
        )
    if not results:
        raise FederationError("the run stopped before it finished; see the errors above")
    return results[0]
