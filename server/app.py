"""The coordinator's Flower ServerApp: runs the rounds, writes MLflow, saves the model."""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from flwr.app import Context, UserConfig
from flwr.serverapp import Grid, ServerApp
from omegaconf import OmegaConf

from federation import flowerpatch, keys
from federation.compose import compose_config, config_from_json, select_metric
from federation.config import MedfedConfig, config_sha256, config_to_json, flatten, resolve_path
from federation.ledger import latest_entries
from federation.logs import context_logger, setup_logging
from federation.modelpack import PACKAGE_FILE, ModelCard, ModelPackage
from federation.modelserve import save_mlflow_model
from federation.provision import CoordinatorKit
from federation.tracking import RunTracker, code_version, default_tracking_uri
from server.central import COORDINATOR
from server.checkpoint import CONFIG_FILE, RUN_DIR_TAG, Checkpoint, check_run_dir
from server.deploy import registered_nodes
from server.grids import PackingGrid, PollingGrid
from server.loop import BEST_MODEL_FILE, INIT_TAG, RoundLoop, RunHistory
from server.members import MemberGrid
from server.quality import collect_quality
from server.report import EVALUATION_TABLE, RunResult, evaluation_rows, plot_history

__all__ = ["app", "config_from_run_config", "coordinate", "create_server_app"]


def config_from_run_config(run_config: UserConfig) -> MedfedConfig:
    """The run's config from Flower's run config; the embedded defaults when unset."""
    text = str(run_config.get(keys.RUN_CONFIG_JSON, "") or "")
    return config_from_json(text) if text else compose_config([])


def _start_tracking(
    cfg: MedfedConfig, run_name: str, run_dir: Path
) -> tuple[RunTracker, Checkpoint | None]:
    """A new MLflow run, or the checkpointed run's own when resuming.

    Raises:
        FileExistsError: A run of this name exists and `resume` is not set.
        FileNotFoundError: `resume` is set but the run has no checkpoint.
    """
    uri = cfg.tracking.uri or default_tracking_uri()
    check_run_dir(run_dir, resume=cfg.resume)
    if cfg.resume:
        checkpoint = Checkpoint.load(run_dir)
        return RunTracker.reopen(uri, checkpoint.mlflow_run_id), checkpoint
    tracker = RunTracker(
        uri,
        experiment=cfg.tracking.experiment,
        run_name=run_name,
        params=flatten(asdict(cfg)),
        tags={
            "medfed.engine": cfg.federation.engine,
            "medfed.sites": ",".join(cfg.federation.names()),
            "medfed.task": cfg.task.name,
            "medfed.strategy": cfg.strategy.name,
            RUN_DIR_TAG: str(run_dir),
        },
    )
    return tracker, None


def _package_best(cfg: MedfedConfig, run_dir: Path, checkpoint: Checkpoint) -> Path:
    """The best round's model as a self-contained package (`federation.modelpack`)."""
    package = ModelPackage(
        task=cfg.task,
        model=cfg.model,
        state=torch.load(run_dir / BEST_MODEL_FILE, weights_only=True),
        card=ModelCard(
            name=cfg.tracking.registered_model or f"medfed-{cfg.task.name}",
            version="",
            run=str(cfg.run_name),
            round=checkpoint.best_round,
            config_sha256=config_sha256(cfg),
        ),
    )
    return package.save(run_dir / PACKAGE_FILE)


def _register_best(tracker: RunTracker, cfg: MedfedConfig, run_dir: Path) -> str | None:
    """Package the best round's model; register it with tags tracing it to run and data."""
    checkpoint = Checkpoint.load(run_dir)
    if checkpoint.best_round < 0:
        return None
    package = _package_best(cfg, run_dir, checkpoint)
    name = cfg.tracking.registered_model
    if name == "":
        return None
    spend = latest_entries(run_dir / "ledger")
    history = RunHistory.from_dict(checkpoint.history)
    tags = {
        "medfed.run_name": str(cfg.run_name),
        "medfed.config_sha256": config_sha256(cfg),
        "medfed.code_version": code_version(),
        "medfed.strategy": cfg.strategy.name,
        "medfed.privacy": cfg.privacy.mode,
        "medfed.best_round": str(checkpoint.best_round),
        f"medfed.best_{select_metric(cfg)}": f"{checkpoint.best_value:.6f}",
        **({INIT_TAG: history.started_from} if history.started_from else {}),
        **{f"medfed.site.{site}.dataset": d for site, d in history.datasets.items()},
        **{f"medfed.site.{site}.epsilon": f"{e.epsilon:.6f}" for site, e in spend.items()},
    }
    model_dir = run_dir / "mlflow-model"
    shutil.rmtree(model_dir, ignore_errors=True)  # a resumed run registers anew
    save_mlflow_model(package, model_dir)
    version = tracker.register_model(
        name or f"medfed-{cfg.task.name}",
        model_dir,
        tags=tags,
        description=(
            f"Best global model of run {cfg.run_name} (round {checkpoint.best_round}), with "
            "its task and preprocessing (medfed site predict --model models:/NAME/VERSION); "
            "the run's config.json and the sites' signed ledgers are the run's artifacts."
        ),
    )
    return version


def coordinate(grid: Grid, cfg: MedfedConfig) -> RunResult:
    """Run (or resume) the federation and record it: MLflow, checkpoints, models, plot."""
    run_name = cfg.run_name or dt.datetime.now().strftime("medfed-%Y%m%d-%H%M%S")
    cfg = dataclasses.replace(cfg, run_name=run_name)
    run_dir = resolve_path(cfg.output_dir) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    log = context_logger(run=run_name)
    tracker, checkpoint = _start_tracking(cfg, run_name, run_dir)
    log.info("MLflow run %s in %s", tracker.run_id, tracker.uri)
    if checkpoint is None:
        (run_dir / CONFIG_FILE).write_text(config_to_json(dataclasses.replace(cfg, resume=False)))
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        for name in (CONFIG_FILE, "config.yaml"):
            tracker.log_artifact(run_dir / name)
    try:
        if checkpoint is None:  # a resumed run showed its sites' data quality already
            collect_quality(grid, cfg, run_name=run_name, out_dir=run_dir, tracker=tracker)
        arrays, history = RoundLoop(
            grid,
            cfg,
            run_name=run_name,
            run_dir=run_dir,
            coordinator_dir=resolve_path(cfg.output_dir) / COORDINATOR,
            tracker=tracker,
            resume_from=checkpoint,
        ).run()
    except BaseException as err:
        tracker.set_tag("medfed.error", str(err)[:4000])
        tracker.finish(ok=False)
        raise
    model_path = run_dir / "global_model.pt"
    torch.save(arrays.to_torch_state_dict(), model_path)
    history.save(run_dir / "history.json")
    plot_history(history, run_dir / "rounds.png")
    for name in ("global_model.pt", "history.json", "rounds.png"):
        tracker.log_artifact(run_dir / name)
    if cfg.rounds == 0:  # evaluation only: the model is not new, nothing is registered
        tracker.log_table(evaluation_rows(history), EVALUATION_TABLE)
        version = None
    else:
        version = _register_best(tracker, cfg, run_dir)
    tracker.finish(ok=True)
    log.info(
        "final model saved to %s%s",
        model_path,
        f"; best model registered as version {version}" if version else "",
    )
    return RunResult(run_name, history, run_dir, tracker.uri, tracker.run_id, tracker.experiment_id)


def create_server_app(
    cfg: MedfedConfig | None = None,
    on_done: Callable[[RunResult], None] | None = None,
    *,
    wrap_grid: Callable[[Grid], Grid] | None = None,
) -> ServerApp:
    """Build the coordinator's ServerApp.

    Args:
        cfg: The run configuration; `None` reads it from Flower's run config.
        on_done: Called with the result when the run finished.
        wrap_grid: Wraps the grid the coordinator talks to the sites through (e.g. to
            record what the coordinator receives).

    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        setup_logging()  # in deployment this is a process of its own; its log goes to `flwr log`
        run_cfg = cfg or config_from_run_config(context.run_config)
        if run_cfg.federation.engine == "deployment":
            flowerpatch.short_serverapp_pulls()
            grid = PollingGrid(grid, cap=run_cfg.federation.poll_interval)
        grid = PackingGrid(grid)
        if run_cfg.federation.engine == "deployment" and run_cfg.federation.kit:
            # A kit's SuperLink: sites are named by their keys; outside the packing, so
            # every reply is read as the site sent it.
            identities = registered_nodes(CoordinatorKit(resolve_path(run_cfg.federation.kit)))
            grid = MemberGrid(grid, identities, run_name=run_cfg.run_name or "")
        if wrap_grid is not None:
            grid = wrap_grid(grid)
        result = coordinate(grid, run_cfg)
        if on_done is not None:
            on_done(result)

    return app


app = create_server_app()
