"""Helpers the test modules share: a small run, launched through the `medfed` CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from tests.conftest import TINY_RUN

# Two rounds of the tiny run: what most end-to-end tests train.
SMALL = ["rounds=2", *TINY_RUN]


def medfed_run(
    tmp_path: Path, data_root: Path, *overrides: str
) -> subprocess.CompletedProcess[str]:
    """`medfed run` (simulation) of SMALL on `data_root`, with its outputs under `tmp_path`."""
    return medfed_cli(tmp_path, "run", *SMALL, *_places(tmp_path, data_root), *overrides)


def medfed_evaluate(
    tmp_path: Path, data_root: Path, model: str, *overrides: str, flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """`medfed evaluate --model MODEL` (simulation) on `data_root`, placed as `medfed_run`."""
    return medfed_cli(
        tmp_path,
        "evaluate",
        "--model",
        model,
        *flags,
        *TINY_RUN,
        *_places(tmp_path, data_root),
        *overrides,
    )


def _places(tmp_path: Path, data_root: Path) -> list[str]:
    return [
        f"data.root={data_root}",
        f"output_dir={tmp_path / 'outputs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]


def medfed_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The `medfed` CLI run in `tmp_path`."""
    return subprocess.run(
        [sys.executable, "-m", "medfed.cli", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def mlflow_run(tmp_path: Path, name: str) -> tuple[MlflowClient, Any]:
    """The MLflow client of `medfed_run`'s store and the one run named `name` in it."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("medfed").experiment_id],
        filter_string=f"attributes.run_name = '{name}'",
    )
    assert len(runs) == 1
    return client, runs[0]
