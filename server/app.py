"""The coordinator's Flower ServerApp: runs the rounds, writes MLflow, saves the model."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from flwr.app import Context, UserConfig
from flwr.serverapp import Grid, ServerApp
from omegaconf import OmegaConf

from federation import keys
from federation.config import (
    MedfedConfig,
    compose_config,
    config_from_json,
    flatten,
    resolve_path,
)
from federation.logs import context_logger
from federation.tracking import RunTracker, default_tracking_uri
from server.central import COORDINATOR
from server.loop import RunHistory, run_rounds
from server.report import plot_history

__all__ = ["RunResult", "app", "config_from_run_config", "coordinate", "create_server_app"]


@dataclass(frozen=True)
class RunResult:
    """Where a finished run left its results."""

    run_name: str
    history: RunHistory
    output_dir: Path
    tracking_uri: str
    mlflow_run_id: str
    mlflow_experiment_id: str


def config_from_run_config(run_config: UserConfig) -> MedfedConfig:
    """The run's config from Flower's run config; the embedded defaults when unset."""
    text = str(run_config.get(keys.RUN_CONFIG_JSON, "") or "")
    return config_from_json(text) if text else compose_config([])


def coordinate(grid: Grid, cfg: MedfedConfig) -> RunResult:
    """Run the federation and record it: MLflow run, final model, history, plot."""
    run_name = cfg.run_name or dt.datetime.now().strftime("medfed-%Y%m%d-%H%M%S")
    out_dir = resolve_path(cfg.output_dir) / run_name
    out_dir.mkdir(parents=True, exist_ok=True)
    uri = cfg.tracking.uri or default_tracking_uri()
    log = context_logger(run=run_name)
    tracker = RunTracker(
        uri,
        experiment=cfg.tracking.experiment,
        run_name=run_name,
        params=flatten(asdict(cfg)),
        tags={
            "medfed.engine": cfg.federation.engine,
            "medfed.sites": ",".join(cfg.federation.names()),
            "medfed.task": cfg.task.name,
        },
    )
    log.info("MLflow run %s in %s", tracker.run_id, uri)
    try:
        arrays, history = run_rounds(
            grid,
            cfg,
            run_name=run_name,
            ledger_dir=out_dir / "ledger",
            coordinator_dir=resolve_path(cfg.output_dir) / COORDINATOR,
            tracker=tracker,
        )
    except BaseException as err:
        tracker.set_tag("medfed.error", str(err)[:4000])
        tracker.finish(ok=False)
        raise
    model_path = out_dir / "global_model.pt"
    torch.save(arrays.to_torch_state_dict(), model_path)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    history.save(out_dir / "history.json")
    plot_history(history, out_dir / "rounds.png")
    tracker.log_artifact(model_path, "model")
    for name in ("config.yaml", "history.json", "rounds.png"):
        tracker.log_artifact(out_dir / name)
    tracker.finish(ok=True)
    log.info("final model saved to %s", model_path)
    return RunResult(run_name, history, out_dir, uri, tracker.run_id, tracker.experiment_id)


def create_server_app(
    cfg: MedfedConfig | None = None, on_done: Callable[[RunResult], None] | None = None
) -> ServerApp:
    """Build the coordinator's ServerApp.

    Args:
        cfg: The run configuration; `None` reads it from Flower's run config.
        on_done: Called with the result when the run finished.

    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg or config_from_run_config(context.run_config)
        if run_cfg.federation.engine == "deployment":
            from server.deploy import PollingGrid

            grid = PollingGrid(grid, run_cfg.federation.poll_interval)
        result = coordinate(grid, run_cfg)
        if on_done is not None:
            on_done(result)

    return app


app = create_server_app()
