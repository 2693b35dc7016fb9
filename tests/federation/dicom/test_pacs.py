"""Prepare a site from a real Orthanc PACS on loopback, over DICOMweb and over C-FIND/C-GET."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from client.supernode import free_port
from federation.dicom.cache import VolumeCache
from federation.dicom.prepare import prepare_folder
from medfed.cli import main

ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@pytest.fixture(scope="module", autouse=True)
def _orthanc_installed() -> None:
    """A missing PACS is a failure, not a skip: `.ci/run` installs it."""
    assert ORTHANC is not None and DICOMWEB_PLUGIN.exists(), (
        "Orthanc is not installed: apt-get install orthanc orthanc-dicomweb (as .ci/run does)"
    )


def _c_store(folder: Path, port: int) -> int:
    from pynetdicom import AE

    files = sorted(folder.rglob("*.dcm"))
    ae = AE(ae_title="UPLOADER")
    for uid in sorted(
        {str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files}
    ):
        ae.add_requested_context(uid, pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="ORTHANC")
    assert assoc.is_established, "Orthanc refused the C-STORE association"
    try:
        stored = sum(assoc.send_c_store(pydicom.dcmread(f)).Status == 0 for f in files)
    finally:
        assoc.release()
    return stored


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, consortium) -> Iterator[tuple[int, int, Path]]:
    """Orthanc with the DICOMweb plugin on own ports, holding site-1's studies."""
    root, _ = consortium
    work = tmp_path_factory.mktemp("orthanc")
    http, dicom = free_port(), free_port()
    config = {
        "Name": "medfed-test-pacs",
        "StorageDirectory": str(work / "db"),
        "IndexDirectory": str(work / "db"),
        "HttpPort": http,
        "DicomPort": dicom,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomModalities": {"medfed": ["MEDFED", "127.0.0.1", free_port()]},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (work / "orthanc.json").write_text(json.dumps(config))
    log = (work / "orthanc.log").open("w")
    proc = subprocess.Popen([str(ORTHANC), str(work / "orthanc.json")], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{http}/system", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"Orthanc did not start: {(work / 'orthanc.log').read_text()[-2000:]}"
                    )
                time.sleep(0.3)
        assert _c_store(root / "site-1", dicom) == len(list((root / "site-1").rglob("*.dcm")))
        yield http, dicom, root / "site-1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


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
