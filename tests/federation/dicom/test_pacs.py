"""Prepare a site from a real Orthanc PACS on loopback, over DICOMweb and over C-FIND/C-GET."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from federation.dicom.cache import VolumeCache
from federation.dicom.prepare import prepare_folder
from medfed.cli import main
from tests.orthanc import running_orthanc


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, consortium) -> Iterator[tuple[int, int, Path]]:
    """Orthanc with the DICOMweb plugin on own ports, holding site-1's studies."""
    root, _ = consortium
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as orthanc:
        assert orthanc.c_store(root / "site-1") == len(list((root / "site-1").rglob("*.dcm")))
        yield orthanc.http, orthanc.dicom, root / "site-1"


@pytest.fixture(scope="module")
def reference(pacs, tmp_path_factory) -> dict[tuple[int, ...], np.ndarray]:
    """Site-1 prepared from its folder: HU volumes by shape and label sum."""
    _, _, folder = pacs
    out = tmp_path_factory.mktemp("folder")
    report = prepare_folder(folder, out)
    cache = VolumeCache(out)
    return {_signature(cache, e.key): np.asarray(cache.get(e.key).hu) for e in report.entries}


def _signature(cache: VolumeCache, key: str) -> tuple[int, ...]:
    volume = cache.get(key)
    assert volume.label is not None
    return (*volume.hu.shape, int(volume.label.sum()))


def _check_same_as_folder(out: Path, reference: dict[tuple[int, ...], np.ndarray]) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    assert json.loads((out / "quarantine.json").read_text()) == []
    assert len(manifest) == len(reference) and {e["label"] for e in manifest} == {"seg"}
    cache = VolumeCache(out)
    for entry in manifest:
        np.testing.assert_array_equal(
            cache.get(entry["key"]).hu, reference[_signature(cache, entry["key"])]
        )


@pytest.mark.parametrize("scheme", ["dicomweb", "dimse"])
def test_prepare_from_pacs_matches_the_folder(pacs, reference, tmp_path, capsys, scheme):
    http, dicom, _ = pacs
    source = {
        "dicomweb": f"dicomweb://127.0.0.1:{http}/dicom-web",
        "dimse": f"dimse://ORTHANC@127.0.0.1:{dicom}",
    }[scheme]
    out = tmp_path / "out"
    args = ["site", "prepare", "--source", source, "--output", str(out), "--modality", "CT"]
    assert main(args) == 0
    assert f"{len(reference)} series ready ({len(reference)} prepared" in capsys.readouterr().out
    _check_same_as_folder(out, reference)
    # A query that matches nothing prepares nothing and still finishes.
    empty = tmp_path / "empty"
    assert main([*args[:-4], "--output", str(empty), "--modality", "MR"]) == 0
    assert json.loads((empty / "manifest.json").read_text()) == []
