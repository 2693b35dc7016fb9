"""MLflow tracking, written by the coordinator only (sites send metrics, never write)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

__all__ = ["RunTracker", "default_tracking_uri"]

_MAX_PARAMS_PER_BATCH = 100


def default_tracking_uri(base: Path | None = None) -> str:
    """An SQLite store `mlflow.db` in `base` (default: the working directory)."""
    return f"sqlite:///{((base or Path.cwd()) / 'mlflow.db').resolve()}"


def _artifact_root(uri: str) -> str | None:
    """Artifacts beside an SQLite store, so a store and its files travel together."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


class RunTracker:
    """One MLflow run per federated run.

    Args:
        uri: Tracking URI (SQLite file or an MLflow server).
        experiment: Experiment name, created when missing.
        run_name: Name of the MLflow run.
        params: Flat, resolved configuration logged as parameters.
        tags: Extra run tags.

    """

    def __init__(
        self,
        uri: str,
        *,
        experiment: str,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str] | None = None,
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri
        with warnings.catch_warnings():
            # MLflow's SQLAlchemy models use a loader SQLAlchemy 2.1 deprecates.
            warnings.simplefilter("ignore", DeprecationWarning)
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            exp_id = (
                found.experiment_id
                if found is not None
                else self.client.create_experiment(
                    experiment, artifact_location=_artifact_root(uri)
                )
            )
            self.run_id: str = self.client.create_run(
                exp_id, run_name=run_name, tags=tags or {}
            ).info.run_id
        self.experiment_id: str = exp_id
        self._log_params(params)

    def _log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in sorted(params.items())]
        for start in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + _MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        """Log finite metrics at a round (infinite epsilon without DP is skipped)."""
        from mlflow.entities import Metric

        now = _now_ms()
        batch = [
            Metric(key, float(value), now, step)
            for key, value in sorted(metrics.items())
            if math.isfinite(float(value))
        ]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Attach a file to the run."""
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        """Set a run tag."""
        self.client.set_tag(self.run_id, key, value)

    def finish(self, *, ok: bool) -> None:
        """Mark the run FINISHED or FAILED."""
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
