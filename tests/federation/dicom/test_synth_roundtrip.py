"""What the generator writes reads back with the right geometry, intensities and labels."""

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest

from federation.dicom.prepare import labelled_volumes
from federation.dicom.scan import iter_files, scan_paths
from federation.dicom.synth import generate_consortium, patient_id, phantom
from federation.dicom.volume import group_series
from tests.conftest import SEED, SLICES


def test_files_are_valid_ct_and_seg_objects(consortium):
    root, profiles = consortium
    for profile in profiles:
        files = sorted((root / profile.name).rglob("*.dcm"))
        assert len(files) == profile.patients * (SLICES + 1)
        kinds = Counter()
        for path in files:
            ds = pydicom.dcmread(path)
            kinds[ds.Modality] += 1
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            if ds.Modality == "CT":
                assert ds.Manufacturer == profile.manufacturer
                assert ds.SOPClassUID == pydicom.uid.CTImageStorage
                assert float(ds.RescaleSlope) == profile.rescale_slope
                assert float(ds.RescaleIntercept) == profile.rescale_intercept
                assert ds.PixelRepresentation == int(profile.signed)
                assert ds.Rows == ds.Columns == profile.rows
            else:
                assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
        assert kinds == {"CT": profile.patients * SLICES, "SEG": profile.patients}


def test_uids_are_unique_and_seg_references_its_series(consortium):
    root, _ = consortium
    # Each site's labels.csv (class labels) sits beside its DICOM; everything else is DICOM.
    scan = scan_paths(p for p in iter_files(root) if p.name != "labels.csv")
    assert not scan.problems
    series = group_series(scan.instances)
    all_sops = [i.sop_uid for i in scan.instances]
    assert len(all_sops) == len(set(all_sops))
    assert len({insts[0].study_uid for insts in series.values()}) == len(series)
    segs = [i for i in scan.instances if i.kind == "seg"]
    assert sorted(r for i in segs for r in i.references) == sorted(series)


def test_volumes_read_back_with_geometry_hu_and_labels(consortium, tmp_path):
    root, profiles = consortium
    for profile in profiles:
        volumes, report = labelled_volumes(root / profile.name, tmp_path / profile.name)
        assert report.problems == []
        assert len(volumes) == profile.patients
        truth = {}
        for p in range(profile.patients):
            truth[patient_id(profile, p)] = phantom(profile, p, slices=SLICES, seed=SEED)
        for volume in volumes:
            ds = pydicom.dcmread(next((root / profile.name).rglob(f"{volume.sop_uids[0]}.dcm")))
            hu, mask = truth[str(ds.PatientID)]
            assert volume.hu.shape == (SLICES, profile.rows, profile.rows)
            assert volume.spacing == pytest.approx(
                (profile.slice_thickness, profile.pixel_spacing, profile.pixel_spacing)
            )
            np.testing.assert_allclose(volume.direction, np.eye(3))
            # Sorted along the normal, whatever order the instances were numbered in.
            assert volume.origin[2] == pytest.approx(0.0)
            # Stored values are rounded to the slope's resolution.
            np.testing.assert_allclose(volume.hu, hu, atol=profile.rescale_slope / 2 + 1e-3)
            np.testing.assert_array_equal(volume.label, mask)
            assert volume.label.sum() > 0


def test_generation_is_deterministic_and_seeded(tmp_path):
    kwargs = {"site_names": ["a"], "patients_per_site": [1], "slices": 8}
    generate_consortium(tmp_path / "x", seed=5, **kwargs)
    generate_consortium(tmp_path / "y", seed=5, **kwargs)
    generate_consortium(tmp_path / "z", seed=6, **kwargs)
    names = lambda d: sorted(p.name for p in (tmp_path / d).rglob("*.dcm"))  # noqa: E731
    assert names("x") == names("y")
    assert names("x") != names("z")
    for rel in (p.relative_to(tmp_path / "x") for p in (tmp_path / "x").rglob("*.dcm")):
        if rel.name == "seg.dcm":
            continue
        assert (tmp_path / "x" / rel).read_bytes() == (tmp_path / "y" / rel).read_bytes()


def test_sites_differ_like_hospitals(consortium):
    _, profiles = consortium
    assert len({p.manufacturer for p in profiles}) == len(profiles)
    assert len({p.rows for p in profiles}) == len(profiles)
    assert len({round(p.noise_hu, 3) for p in profiles}) == len(profiles)
    assert len({(p.rescale_slope, p.rescale_intercept, p.signed) for p in profiles}) > 1


def _thickness(folder):
    return float(pydicom.dcmread(next(folder.glob("2.25.*.dcm"))).SliceThickness)


def _copy_patient(root, tmp_path):
    src = next(d for d in sorted((root / "site-1").iterdir()) if d.is_dir())
    dst = tmp_path / "site"
    shutil.copytree(src, dst / src.name)
    return dst / src.name


def test_missing_slice_and_junk_files_are_reported_not_used(consortium, tmp_path):
    root, _ = consortium
    patient = _copy_patient(root, tmp_path)
    ct = sorted(p for p in patient.glob("*.dcm") if p.name != "seg.dcm")
    by_z = sorted(ct, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    by_z[len(by_z) // 2].unlink()
    (patient / "notes.txt").write_text("not dicom")
    volumes, report = labelled_volumes(patient.parent, tmp_path / "cache")
    assert volumes == []
    reasons = {Path(p.path).name: p.reason for p in report.problems}
    assert reasons.pop("notes.txt").startswith("not DICOM")
    assert reasons.pop("seg.dcm").startswith("label of a quarantined series")
    assert set(reasons.values()) == {
        "inconsistent series geometry: 1 missing slices "
        f"(gaps of {_thickness(patient):.3f} mm expected)"
    }
    assert len(reasons) == len(ct) - 1


def test_duplicate_slices_and_orphan_seg_are_reported(consortium, tmp_path):
    root, _ = consortium
    patient = _copy_patient(root, tmp_path)
    ct = sorted(p for p in patient.glob("*.dcm") if p.name != "seg.dcm")
    ds = pydicom.dcmread(ct[0])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(patient / "dup.dcm")
    volumes, report = labelled_volumes(patient.parent, tmp_path / "cache")
    assert volumes == []
    assert {p.reason for p in report.problems if p.path.endswith("dup.dcm")} == {
        "inconsistent series geometry: 1 duplicate slices"
    }

    for path in [*ct, patient / "dup.dcm"]:
        path.unlink()
    volumes, report = labelled_volumes(patient.parent, tmp_path / "cache")
    assert volumes == []
    assert [(Path(p.path).name, p.reason) for p in report.problems] == [
        ("seg.dcm", "SEG without its source series")
    ]
