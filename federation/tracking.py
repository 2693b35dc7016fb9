"""MLflow tracking, written by the coordinator only (sites send metrics, never write)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from federation import __version__

__all__ = [
    "MODEL_ARTIFACT",
    "RunTracker",
    "code_version",
    "default_tracking_uri",
    "download_registered",
]

# The run artifact holding the registered MLflow model (with the medfed package inside).
MODEL_ARTIFACT = "model"

_MAX_PARAMS_PER_BATCH = 100


def default_tracking_uri(base: Path | None = None) -> str:
    """An SQLite store `mlflow.db` in `base` (default: the working directory)."""
    return f"sqlite:///{((base or Path.cwd()) / 'mlflow.db').resolve()}"


def code_version() -> str:
    """Medfed's version, with the git commit when running from a checkout."""
    import subprocess

    source = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    dirty = subprocess.run(
        ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    ).stdout.strip()
    return f"{__version__}+g{commit}{'.dirty' if dirty else ''}"


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

    @classmethod
    def reopen(cls, uri: str, run_id: str) -> RunTracker:
        """Continue logging into an existing run (a resumed federated run).

        Raises:
            ValueError: The store has no such run.
        """
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        tracker = cls.__new__(cls)
        tracker.uri = uri
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            tracker.client = MlflowClient(tracking_uri=uri)
            try:
                run = tracker.client.get_run(run_id)
            except MlflowException as err:
                raise ValueError(f"MLflow run {run_id} is not in {uri}: {err.message}") from err
        tracker.run_id = run_id
        tracker.experiment_id = run.info.experiment_id
        tracker.client.update_run(run_id, status="RUNNING")
        return tracker

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

    def log_table(self, rows: list[dict[str, Any]], name: str) -> None:
        """Attach a table (one dict per row) that the MLflow UI shows as one."""
        columns = list(rows[0]) if rows else []
        self.client.log_table(self.run_id, {c: [r.get(c) for r in rows] for c in columns}, name)

    def set_tag(self, key: str, value: str) -> None:
        """Set a run tag."""
        self.client.set_tag(self.run_id, key, value)

    def register_model(
        self, name: str, model_dir: Path, *, tags: dict[str, str], description: str
    ) -> str:
        """Attach an MLflow model folder to the run (as `model/`); register a new version.

        Returns:
            The new model version.
        """
        from mlflow.exceptions import MlflowException

        self.client.log_artifacts(self.run_id, str(model_dir), MODEL_ARTIFACT)
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(
                name, description="Global models of medfed federated runs."
            )
        source = f"{self.client.get_run(self.run_id).info.artifact_uri}/{MODEL_ARTIFACT}"
        version = self.client.create_model_version(
            name, source, run_id=self.run_id, tags=tags, description=description
        )
        return str(version.version)

    def finish(self, *, ok: bool) -> None:
        """Mark the run FINISHED or FAILED."""
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def download_registered(reference: str, uri: str, destination: Path) -> tuple[str, str, Path]:
    """Download a registered model version (`models:/NAME/VERSION` or `models:/NAME@ALIAS`).

    Returns:
        The model's name, its version, and the folder it was downloaded into.

    Raises:
        ValueError: The reference is malformed or the registry has no such version.
    """
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    body = reference.removeprefix("models:/")
    client = MlflowClient(tracking_uri=uri)
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            found = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = body.rpartition("/")
            if not name or not number.isdigit():
                raise ValueError(f"{reference!r} is not models:/NAME/VERSION or models:/NAME@ALIAS")
            found = client.get_model_version(name, number)
        folder = download_artifacts(
            artifact_uri=str(found.source), dst_path=str(destination), tracking_uri=uri
        )
    except MlflowException as err:
        raise ValueError(f"no model {reference} in the registry at {uri}: {err.message}") from err
    return name, str(found.version), Path(folder)
