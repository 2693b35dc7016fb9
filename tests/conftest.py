"""Shared fixtures: a small synthetic consortium written as real DICOM."""

from __future__ import annotations

from pathlib import Path

import pytest

from federation.dicom.synth import SiteProfile, generate_consortium

SITES = ["site-1", "site-2", "site-3"]
SLICES = 12
SEED = 3


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
