"""Shared fixtures: a small synthetic consortium written as real DICOM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from federation.dicom.synth import SiteProfile, generate_consortium

SITES = ["site-1", "site-2", "site-3"]
SLICES = 12
SEED = 3
REPO = Path(__file__).resolve().parents[1]
# A run small enough for a test: tiny images, one local epoch, the data already generated.
TINY_RUN = [
    "task.image_size=32",
    "task.local_epochs=1",
    "task.batch_size=8",
    "data.generate=false",
    f"seed={SEED}",
]


def run_sites_module(
    module: str, record: Path, overrides: list[str], *, cwd: Path
) -> subprocess.CompletedProcess[str]:
    """Run a simulated consortium of test sites (`python -m tests.server.<module>`).

    The run's working directory is `cwd`, so `tests` is put on PYTHONPATH explicitly.
    """
    return subprocess.run(
        [sys.executable, "-m", f"tests.server.{module}", str(record), *overrides],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


@pytest.fixture(scope="session")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SiteProfile]]:
    """Three sites x 3 patients x 12 slices, generated once per test session."""
    root = tmp_path_factory.mktemp("consortium")
    profiles = generate_consortium(
        root, site_names=SITES, patients_per_site=[3, 3, 4], slices=SLICES, seed=SEED
    )
    return root, profiles


@pytest.fixture(scope="session")
def labelled_consortium(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SiteProfile]]:
    """Three sites x 4 patients x 8 slices: two of each class per site (classification)."""
    root = tmp_path_factory.mktemp("labelled")
    profiles = generate_consortium(
        root, site_names=SITES, patients_per_site=[4], slices=8, seed=SEED
    )
    return root, profiles
