"""Every file pydicom ships for testing (with pydicom-data): used or quarantined, no crash."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from pydicom.data import get_testdata_files

from federation.dicom.prepare import PrepareReport, prepare_folder


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[PrepareReport, dict[str, str]]:
    files = sorted(f for f in get_testdata_files() if Path(f).is_file())
    # pydicom-data is a dev dependency: without it this is a failure, not a skip.
    assert len(files) >= 200, f"only {len(files)} pydicom test files: install pydicom-data"
    src = tmp_path_factory.mktemp("testdata")
    names = {}
    for i, f in enumerate(files):
        link = src / f"{i:03d}-{Path(f).name}"
        link.symlink_to(f)
        names[str(link)] = Path(f).name
    return prepare_folder(src, tmp_path_factory.mktemp("cache")), names


def test_every_file_is_used_or_quarantined_once(report):
    result, names = report
    quarantined = Counter(p.path for p in result.problems)
    assert max(quarantined.values()) == 1
    used = sum(e.files for e in result.entries)
    assert used + len(quarantined) == len(names)
    assert used >= 1  # the enhanced multi-frame CT becomes a volume
    assert all(p.reason and p.path in names for p in result.problems)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("MR_truncated.dcm", "truncated: pixel data needs 8192 bytes"),
        ("no_meta.dcm", "not DICOM: no DICM preamble"),
        ("rtplan.dcm", "no pixel data (RT Plan Storage)"),
        ("rtstruct.dcm", "RTSTRUCT without its source series"),
        ("liver.dcm", "SEG without its source series"),
        ("US1_J2KR.dcm", "colour image (3 samples per pixel)"),
        ("emri_small.dcm", "multi-frame MR (10 frames) without per-frame geometry"),
        ("CT_small.dcm", "inconsistent series geometry: a single slice is not a volume"),
        ("MR_small_jpeg_ls_lossless.dcm", "inconsistent series geometry: 7 duplicate slices"),
        ("RG1_UNCR.dcm", "not a cross-sectional image: no ImagePositionPatient"),
    ],
)
def test_expected_files_are_quarantined_with_specific_reasons(report, name, reason):
    result, names = report
    reasons = {p.reason for p in result.problems if names[p.path] == name}
    assert reasons and all(r.startswith(reason) for r in reasons), reasons


def test_fast_header_reader_agrees_with_pydicom(report, consortium, monkeypatch):
    import dataclasses

    import federation.dicom.scan as scan

    _, names = report
    root, _ = consortium
    paths = [Path(p) for p in names] + sorted((root / "site-1").rglob("*.dcm"))

    def scanned() -> dict[Path, object]:
        out = {}
        for p in paths:
            found = scan.scan_file(p)
            if isinstance(found, scan.Instance):  # pydicom keeps small pixel data in memory
                found = dataclasses.replace(found, pixel_offset=0)
            out[p] = found
        return out

    fast_hits = sum(scan.read_fast_header(str(p), p.stat().st_size) is not None for p in paths)
    fast = scanned()
    monkeypatch.setattr(scan, "read_fast_header", lambda *_: None)
    assert scanned() == fast
    assert fast_hits > 100
