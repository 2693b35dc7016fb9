"""`medfed site prepare` on real DICOM folders: manifest, quarantine, labels, cache, PHI gate."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_rescale
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from federation.dicom.cache import VolumeCache
from federation.dicom.phi import identifying_values
from federation.dicom.prepare import HISTOGRAM_STRIDE, PrepareOptions, prepare_folder
from federation.dicom.synth import patient_id
from medfed.cli import main
from tests.conftest import SLICES


def _identifiers(folder: Path) -> set[str]:
    found: set[str] = set()
    for path in folder.rglob("*.dcm"):
        found |= identifying_values(pydicom.dcmread(path, stop_before_pixels=True))
    return found


def test_cli_prepares_a_site_and_a_rerun_only_redoes_what_changed(consortium, tmp_path, capsys):
    root, profiles = consortium
    site = tmp_path / "site-2"
    shutil.copytree(root / "site-2", site)
    before = {p: p.read_bytes() for p in site.rglob("*") if p.is_file()}
    out = tmp_path / "prepared"
    assert main(["site", "prepare", "--source", str(site), "--output", str(out)]) == 0
    assert "3 series ready (3 prepared, 0 unchanged" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert json.loads((out / "quarantine.json").read_text()) == []
    profile = profiles[1]
    assert len(manifest) == profile.patients
    for entry in manifest:
        assert entry["shape"] == [SLICES, profile.rows, profile.rows]
        assert entry["spacing"] == pytest.approx(
            [profile.slice_thickness, profile.pixel_spacing, profile.pixel_spacing]
        )
        assert entry["manufacturer"] == profile.manufacturer and entry["label"] == "seg"
        assert 0 < entry["foreground_fraction"] < 0.5
        sampled = -(-profile.rows // HISTOGRAM_STRIDE)
        assert sum(entry["hu_histogram"]) == SLICES * sampled**2
        volume = VolumeCache(out).get(entry["key"])
        assert volume.hu.dtype == np.int16 and volume.label is not None  # CT: exact HU
    # The manifest names no patient, study, series or institution.
    text = (out / "manifest.json").read_text()
    assert not {v for v in _identifiers(site) if v in text}
    # Sources untouched.
    assert {p: p.read_bytes() for p in site.rglob("*") if p.is_file()} == before

    assert main(["site", "prepare", "--source", str(site), "--output", str(out)]) == 0
    assert "3 series ready (0 prepared, 3 unchanged" in capsys.readouterr().out
    # Change one slice of one patient: only that series is prepared again.
    changed = sorted((site / patient_id(profile, 1)).glob("2.25.*.dcm"))[3]
    ds = pydicom.dcmread(changed)
    ds.PixelData = (np.frombuffer(ds.PixelData, np.int16) + 1).astype(np.int16).tobytes()
    ds.save_as(changed)
    assert main(["site", "prepare", "--source", str(site), "--output", str(out)]) == 0
    assert "3 series ready (1 prepared, 2 unchanged" in capsys.readouterr().out
    # The replaced volume left the cache; nothing else did.
    keys = {e["key"] for e in json.loads((out / "manifest.json").read_text())}
    assert {p.name.split(".")[0] for p in (out / "volumes").iterdir()} == keys
    # A class-label edit counts at once, without preparing anything again.
    csv = site / "labels.csv"
    csv.write_text(csv.read_text().replace("abnormal", "cancer"))
    assert main(["site", "prepare", "--source", str(site), "--output", str(out)]) == 0
    assert "3 series ready (0 prepared, 3 unchanged" in capsys.readouterr().out
    classes = {e["class_label"] for e in json.loads((out / "manifest.json").read_text())}
    assert "cancer" in classes and "abnormal" not in classes


def _patient(root: Path, tmp_path: Path) -> Path:
    src = next(p for p in sorted((root / "site-1").iterdir()) if p.is_dir())
    dst = tmp_path / "site" / src.name
    shutil.copytree(src, dst)
    return dst


def _rtstruct(ref: Dataset, z: float, square: tuple[float, float, float, float]) -> Dataset:
    x0, y0, x1, y1 = square
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTSTRUCT"
    ds.StudyInstanceUID = ref.StudyInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    series = Dataset()
    series.SeriesInstanceUID = ref.SeriesInstanceUID
    study = Dataset()
    study.RTReferencedSeriesSequence = [series]
    frame = Dataset()
    frame.FrameOfReferenceUID = ref.FrameOfReferenceUID
    frame.RTReferencedStudySequence = [study]
    ds.ReferencedFrameOfReferenceSequence = [frame]
    contour = Dataset()
    contour.ContourGeometricType = "CLOSED_PLANAR"
    points = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    contour.NumberOfContourPoints = len(points)
    contour.ContourData = [v for x, y in points for v in (x, y, z)]
    roi = Dataset()
    roi.ReferencedROINumber = 1
    roi.ContourSequence = [contour]
    ds.ROIContourSequence = [roi]
    return ds


def test_rtstruct_nifti_and_csv_labels(consortium, tmp_path):
    root, profiles = consortium
    patient = _patient(root, tmp_path)
    (patient / "seg.dcm").unlink()
    ref = pydicom.dcmread(next(patient.glob("2.25.*.dcm")))
    ps = profiles[0].pixel_spacing
    x0, y0 = [float(v) for v in ref.ImagePositionPatient[:2]]
    dz = profiles[0].slice_thickness
    # A square of columns 10..20 and rows 5..15 on the 4th slice (z = 3 * thickness).
    square = (x0 + 10 * ps, y0 + 5 * ps, x0 + 20 * ps, y0 + 15 * ps)
    _rtstruct(ref, 3 * dz, square).save_as(patient / "rt.dcm", enforce_file_format=True)
    csv = tmp_path / "labels.csv"
    csv.write_text(f"StudyInstanceUID,label\n{ref.StudyInstanceUID},malignant\n")
    out = tmp_path / "out"
    report = prepare_folder(patient.parent, out, options=PrepareOptions(labels_csv=csv))
    [entry] = report.entries
    assert (entry.label, entry.class_label) == ("rtstruct", "malignant")
    mask = VolumeCache(out).get(entry.key).label
    assert mask is not None and set(np.nonzero(mask.any(axis=(1, 2)))[0]) == {3}
    assert mask[3, 5:16, 10:21].all() and mask.sum() == 11 * 11

    # The same square as a NIfTI mask (RAS affine) instead.
    (patient / "rt.dcm").unlink()
    data = np.zeros((profiles[0].rows, profiles[0].rows, SLICES), np.uint8)  # (x=col, y=row, z)
    data[10:21, 5:16, 3] = 1
    affine = np.diag([-ps, -ps, dz, 1.0])
    affine[:3, 3] = [-x0, -y0, 0.0]
    nib.save(nib.Nifti1Image(data, affine), patient / "mask.nii.gz")
    report = prepare_folder(patient.parent, out)
    [entry] = report.entries
    assert entry.label == "nifti"
    nifti_mask = VolumeCache(out).get(entry.key).label
    np.testing.assert_array_equal(nifti_mask, mask)


def test_resampling_to_a_target_spacing_and_modality_aware_normalisation(consortium, tmp_path):
    root, profiles = consortium
    patient = _patient(root, tmp_path)
    profile = profiles[0]
    target = (2 * profile.slice_thickness, 2 * profile.pixel_spacing, 2 * profile.pixel_spacing)
    options = PrepareOptions(target_spacing=target)
    [entry] = prepare_folder(patient.parent, tmp_path / "out", options=options).entries
    assert entry.shape == [SLICES // 2, profile.rows // 2, profile.rows // 2]
    assert entry.spacing == pytest.approx(list(target))
    volume = VolumeCache(tmp_path / "out").get(entry.key)
    assert volume.label is not None and volume.label.shape == volume.hu.shape
    assert set(np.unique(volume.label)) <= {0, 1} and volume.label.any()

    from federation.dicom.volume import normalise

    hu = np.array([[-1000.0, -160.0, 40.0, 240.0, 3000.0]], dtype=np.float32)
    np.testing.assert_allclose(normalise(hu, modality="CT", window=None), [[0, 0, 0.5, 1, 1]])
    mr = np.linspace(0.0, 1000.0, 1001, dtype=np.float32)
    scaled = normalise(mr, modality="MR", window=None)
    assert scaled.min() == 0.0 and scaled.max() == 1.0 and 0.45 < float(np.median(scaled)) < 0.55


@pytest.mark.parametrize(
    ("slope", "intercept", "stored_max", "dtype"),
    [
        (1, -1024, 4095, np.int16),  # CT: exact in int16
        (2, -1024, 4095, np.int16),
        (2, -10000, 20000, np.int16),  # stored x slope beyond int16, the result within
        (0.5, 0.25, 4095, np.float32),  # fractional rescale
        (1, 0, 65535, np.float32),  # rescaled values beyond int16
    ],
)
def test_volume_values_equal_pydicoms_rescale(
    consortium, tmp_path, slope, intercept, stored_max, dtype
):
    root, _ = consortium
    patient = _patient(root, tmp_path)
    rng = np.random.default_rng(0)
    for path in patient.glob("2.25.*.dcm"):
        ds = pydicom.dcmread(path)
        if ds.Modality != "CT":
            continue
        ds.PixelRepresentation = 0
        ds.BitsStored, ds.HighBit = 16, 15
        values = rng.integers(0, stored_max, size=(ds.Rows, ds.Columns), endpoint=True)
        values.flat[0] = stored_max
        ds.PixelData = values.astype(np.uint16).tobytes()
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.save_as(path)
    [entry] = prepare_folder(patient.parent, tmp_path / "out").entries
    volume = VolumeCache(tmp_path / "out").get(entry.key)
    assert volume.hu.dtype == dtype
    for k, uid in enumerate(volume.sop_uids):
        [path] = [p for p in patient.glob("2.25.*.dcm") if pydicom.dcmread(p).SOPInstanceUID == uid]
        ds = pydicom.dcmread(path)
        expected = apply_rescale(ds.pixel_array, ds)
        np.testing.assert_array_equal(volume.hu[k], expected.astype(np.float32))


def test_an_unchanged_folder_is_not_scanned_again_and_any_change_is(
    consortium, tmp_path, monkeypatch
):
    from federation.dicom import prepare

    root, _ = consortium
    site = tmp_path / "site"
    shutil.copytree(root / "site-1", site)
    out = tmp_path / "prepared"
    first = prepare_folder(site, out)
    scans: list[int] = []
    real_scan = prepare.scan_paths
    monkeypatch.setattr(
        prepare, "scan_paths", lambda *a, **k: scans.append(1) or real_scan(*a, **k)
    )
    again = prepare_folder(site, out)
    assert scans == [] and again.prepared == 0 and again.files_seen == first.files_seen
    assert [e.key for e in again.entries] == [e.key for e in first.entries]
    assert again.problems == first.problems
    # Options, a touched file and a lost cached volume each count.
    prepare_folder(site, out, options=PrepareOptions(target_spacing=(2.0, 1.0, 1.0)))
    assert len(scans) == 1
    prepare_folder(site, out)
    assert len(scans) == 2
    prepare_folder(site, out)
    assert len(scans) == 2
    touched = next(site.rglob("*.dcm"))
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    prepare_folder(site, out)
    assert len(scans) == 3
    for path in (out / "volumes").glob(f"{first.entries[0].key}.*"):
        path.unlink()  # a prepared volume lost from the cache
    assert prepare_folder(site, out).prepared == 1 and len(scans) == 4
