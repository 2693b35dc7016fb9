"""The entry point shared by the test consortia run as `python -m tests.server.<module>`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.clientapp.typing import Mod
from flwr.serverapp import Grid

from client.app import create_client_app
from federation.compose import compose_config
from federation.config import MedfedConfig
from federation.logs import setup_logging
from medfed.launch import run_simulation


def simulate_with_mod(
    argv: list[str],
    make_mod: Callable[[Path, MedfedConfig], Mod],
    *,
    every_message: bool = False,
    wrap_grid: Callable[[Grid, Path], Grid] | None = None,
) -> int:
    """Run `RECORD_DIR [hydra overrides...]` with a site mod on train (or every) messages."""
    setup_logging()
    record_dir = Path(argv[0])
    record_dir.mkdir(parents=True, exist_ok=True)
    cfg = compose_config(argv[1:])
    mod = make_mod(record_dir, cfg)
    mods = {"mods": [mod]} if every_message else {"train_mods": [mod]}
    run_simulation(
        cfg,
        client_app_factory=lambda sites: create_client_app(sites, **mods),
        wrap_grid=(lambda grid: wrap_grid(grid, record_dir)) if wrap_grid else None,
    )
    return 0
