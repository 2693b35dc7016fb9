"""De-identification to PS3.15: the gate on the Basic Profile, and `medfed site deidentify`."""

from __future__ import annotations

import json
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from client.deidentify import MAP_FILE, PseudonymMap
from federation.compose import compose_config
from federation.config import PrivacyConfig
from federation.dicom.phi import DeidentificationRequired, identifying_values
from federation.dicom.prepare import PrepareOptions, labelled_volumes, prepare_folder
from federation.dicom.profile import profile_problems
from federation.dicom.synth import generate_consortium
from federation.models import build_model
from federation.tasks import get_task
from medfed.cli import main
from tests.conftest import SEED, SLICES

ORG_UID = "1.2.826.0.1.3680043.8.498.12345"


def _private(ds: Dataset) -> str:
    block = ds.private_block(0x0009, "HOSPITAL PACS", create=True)
    block.add_new(0x10, "LO", "DOE^JANE 1962")
    return "DOE^JANE 1962"


def _nested_uid(ds: Dataset) -> str:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ORG_UID
    ds.ReferencedImageSequence = Sequence([item])
    return ORG_UID


def _nested_text(ds: Dataset) -> str:
    item = Dataset()
    item.Manufacturer = "Vendor"
    item.OperatorsName = "WHITE^WALTER"  # inside a sequence the profile does not name
    ds.ContributingEquipmentSequence = Sequence([item])
    return "WHITE^WALTER"


def _undated(ds: Dataset) -> str:
    """Dates kept without declaring a longitudinal option."""
    ds.DeidentificationMethodCodeSequence = Sequence(
        [i for i in ds.DeidentificationMethodCodeSequence if i.CodeValue != "113107"]
    )
    ds.AcquisitionDateTime = "20240301101500"
    return "20240301101500"


def _set(keyword: str, value: str) -> Callable[[Dataset], str]:
    def inject(ds: Dataset) -> str:
        setattr(ds, keyword, value)
        return value

    return inject


# Each profile category, as a real archive has it: (injector, rule named in the reason).
CATEGORIES: dict[str, tuple[Callable[[Dataset], str], str]] = {
    "free-text": (_set("ImageComments", "Pt. Jane Doe, MRN 4471-22"), "ImageComments"),
    "identity": (_set("PatientName", "DOE^JANE"), "PatientName"),
    "institution": (_set("InstitutionName", "St. Elsewhere General"), "InstitutionName"),
    "descriptor": (_set("SeriesDescription", "CT for Jane Doe"), "SeriesDescription"),
    "nested-text": (_nested_text, "OperatorsName in ContributingEquipmentSequence"),
    "nested-uid": (_nested_uid, "ReferencedSOPInstanceUID in ReferencedImageSequence"),
    "uid": (_set("FrameOfReferenceUID", ORG_UID), "FrameOfReferenceUID: UID not pseudonymised"),
    "dates": (_undated, "AcquisitionDateTime: dates and times"),
    "private": (_private, "private attributes present (group 0009)"),
    "burned-in": (_set("BurnedInAnnotation", "YES"), "BurnedInAnnotation is YES"),
    "not-flagged": (_set("PatientIdentityRemoved", "NO"), "PatientIdentityRemoved is not YES"),
}


def _series_folders(site: Path) -> list[Path]:
    return sorted(p for p in site.iterdir() if p.is_dir())


def _copy_site(root: Path, tmp_path: Path) -> Path:
    site = tmp_path / "site-1"
    shutil.copytree(root / "site-1", site)
    return site


def test_the_generated_consortium_is_deidentified_and_passes_the_gate(consortium):
    root, _ = consortium
    files = sorted(root.rglob("*.dcm"))
    assert files
    for path in files:
        ds = pydicom.dcmread(path)
        assert profile_problems(ds) == [], path
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        assert {i.CodeValue for i in ds.DeidentificationMethodCodeSequence} >= {"113100", "113107"}


@pytest.mark.parametrize("category", list(CATEGORIES))
def test_each_profile_category_injected_is_quarantined_with_its_reason(
    consortium, tmp_path, category
):
    root, _ = consortium
    site = _copy_site(root, tmp_path)
    inject, rule = CATEGORIES[category]
    target = _series_folders(site)[0]
    victim = sorted(p for p in target.glob("*.dcm") if p.name != "seg.dcm")[2]
    ds = pydicom.dcmread(victim)
    value = inject(ds)
    ds.save_as(victim)

    report = prepare_folder(
        site, tmp_path / "out", options=PrepareOptions(require_deidentified=True)
    )
    # The offending series and its SEG are left out; the other series are prepared.
    assert len(report.entries) == len(_series_folders(site)) - 1
    left_out = {Path(p.path).parent for p in report.problems}
    assert left_out == {target} and len(report.problems) == SLICES + 1
    [own] = [p for p in report.problems if Path(p.path) == victim]
    assert rule in own.reason and own.reason.startswith("not de-identified")
    # Reasons name the rule, never the value; counts are what leaves the site.
    quarantine = (tmp_path / "q").joinpath("quarantine.json")
    report.write(quarantine.parent)
    flag = value in ("YES", "NO")  # the flags are not identifying values
    assert flag or value not in quarantine.read_text()
    assert report.reasons() == {"not de-identified": SLICES + 1}

    with pytest.raises(DeidentificationRequired) as refused:
        prepare_folder(
            site,
            tmp_path / "out2",
            options=PrepareOptions(require_deidentified=True, on_phi="refuse"),
        )
    assert refused.value.files == [str(victim)] and (flag or value not in str(refused.value))


def test_real_files_fail_the_gate_and_pass_after_site_deidentify(tmp_path, capsys):
    names = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtplan.dcm", "US1_J2KR.dcm"]
    source = tmp_path / "archive"
    source.mkdir()
    for name in names:
        shutil.copy(get_testdata_file(name), source / name)
    for path in source.iterdir():
        assert profile_problems(pydicom.dcmread(path)), path
    state, out = tmp_path / "state", tmp_path / "deid"
    args = [
        "site",
        "deidentify",
        "--source",
        str(source),
        "--output",
        str(out),
        "--state",
        str(state),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "4 files de-identified (basic)" in printed
    # Ultrasound is expected to carry burned-in text: not written, with the reason.
    assert "US1_J2KR.dcm: BurnedInAnnotation is absent for modality US" in printed
    written = sorted(out.rglob("*.dcm"))
    assert len(written) == 4
    originals = set().union(*(identifying_values(pydicom.dcmread(source / n)) for n in names[:4]))
    for path in written:
        ds = pydicom.dcmread(path)
        assert profile_problems(ds) == [], path
        assert not identifying_values(ds) & originals
        if "PixelData" in ds:
            assert ds.pixel_array.size > 0  # pixel data still decodes
    report = json.loads((state / "deid" / "report.json").read_text())
    assert report["written"] == 4 and len(report["problems"]) == 1


def test_site_deidentify_keeps_labels_intervals_and_dice_and_can_reidentify(tmp_path, capsys):
    archive = tmp_path / "archive"
    generate_consortium(
        archive, site_names=["site-1"], patients_per_site=[3], slices=SLICES, seed=SEED,
        identified=True,
    )  # fmt: skip
    source = archive / "site-1"
    assert all(profile_problems(pydicom.dcmread(p)) for p in source.rglob("*.dcm"))
    state, out = tmp_path / "state", tmp_path / "deid"
    profile = "basic,retain-long-modified-dates,retain-patient-chars"
    args = ["site", "deidentify", "--source", str(source), "--output", str(out)]
    assert main([*args, "--state", str(state), "--profile", profile, "-q"]) == 0
    capsys.readouterr()

    # The gate passes, and SEG references and the labels CSV resolve: every series labelled.
    originals, _ = labelled_volumes(source, tmp_path / "c1")
    copies, report = labelled_volumes(
        out, tmp_path / "c2", options=PrepareOptions(require_deidentified=True, on_phi="refuse")
    )
    assert report.problems == [] and len(copies) == len(originals) == 3
    assert {v.class_label for v in copies} == {v.class_label for v in originals}
    pseudonyms = PseudonymMap(state).pseudonyms
    by_series = {v.series_uid: v for v in copies}
    for volume in originals:
        copy = by_series[pseudonyms.uid(volume.series_uid)]
        np.testing.assert_array_equal(copy.hu, volume.hu)
        np.testing.assert_array_equal(copy.label, volume.label)
        assert copy.class_label == volume.class_label

    # One patient's dates moved together: intervals kept.
    first = pydicom.dcmread(next(source.rglob("*.dcm")))
    copy_path = next(out.rglob(f"{pseudonyms.uid(str(first.SOPInstanceUID))}.dcm"))
    copied = pydicom.dcmread(copy_path)
    assert copied.StudyDate != first.StudyDate and copied.PatientSex == first.PatientSex

    def days(ds: Dataset) -> int:
        study, born = (
            np.datetime64(f"{d[:4]}-{d[4:6]}-{d[6:]}") for d in (ds.StudyDate, ds.PatientBirthDate)
        )
        return int((study - born).astype(int))

    assert days(copied) == days(first)

    # Training on the copy gives the Dice of training on the original (same patients held out).
    cfg = compose_config(["task=seg2d", "task.image_size=16", "task.local_epochs=1"])
    task = get_task("seg2d")
    for copy, volume in zip(
        [by_series[pseudonyms.uid(v.series_uid)] for v in originals], originals, strict=True
    ):
        copy.patient_key = volume.patient_key
    scores = []
    for volumes in (originals, [by_series[pseudonyms.uid(v.series_uid)] for v in originals]):
        model = build_model(cfg.model, seed=0)
        data = task.prepare(volumes, cfg.task, seed=0)
        task.train(model, data, cfg.task, PrivacyConfig(mode="none"), seed=0)
        scores.append(task.evaluate(model, data).metrics["dice"])
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)

    # The map stays at the site, encrypted under a key only its owner reads.
    key = state / "deid" / "pseudonym.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert str(first.PatientID).encode() not in (state / "deid" / MAP_FILE).read_bytes()
    assert main(["site", "reidentify", str(copied.PatientID), "--state", str(state)]) == 0
    assert f"patient: {first.PatientID}" in capsys.readouterr().out
    series = pseudonyms.uid(str(first.SeriesInstanceUID))
    assert main(["site", "reidentify", series, "--state", str(state)]) == 0
    assert f"series: {first.SeriesInstanceUID}" in capsys.readouterr().out
    # A second run gives the same pseudonyms and adds nothing to the map.
    size = (state / "deid" / MAP_FILE).stat().st_size
    assert (
        main(
            [*args[:5], str(tmp_path / "again"), "--state", str(state), "--profile", profile, "-q"]
        )
        == 0
    )
    assert (state / "deid" / MAP_FILE).stat().st_size == size
    assert sorted(p.name for p in (tmp_path / "again").rglob("*.dcm")) == sorted(
        p.name for p in out.rglob("*.dcm")
    )


def test_bad_profiles_and_policies_get_clear_errors(tmp_path):
    with pytest.raises(SystemExit):
        main(["site", "data-policy", "--state", str(tmp_path), "--on-phi", "ignore"])
    from federation.dicom.deidentify import parse_profile

    with pytest.raises(ValueError, match="unknown de-identification option"):
        parse_profile("basic,retain-everything")
    with pytest.raises(ValueError, match="choose one of retain-long-full-dates"):
        parse_profile("retain-long-full-dates,retain-long-modified-dates")


@pytest.mark.parametrize("scheme", ["dicomweb", "dimse"])
def test_site_deidentify_reads_from_a_pacs(tmp_path, scheme):
    from tests.orthanc import running_orthanc

    archive = tmp_path / "archive"
    generate_consortium(
        archive,
        site_names=["site-1"],
        patients_per_site=[2],
        slices=SLICES,
        seed=SEED,
        identified=True,
    )
    files = len(list(archive.rglob("*.dcm")))
    (tmp_path / "orthanc").mkdir()
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        assert orthanc.c_store(archive / "site-1") == files
        source = orthanc.dicomweb if scheme == "dicomweb" else orthanc.dimse
        state, out = tmp_path / "state", tmp_path / "deid"
        args = ["site", "deidentify", "--source", source, "--output", str(out), "-q"]
        assert main([*args, "--state", str(state), "--modality", "CT"]) == 0
    written = sorted(out.rglob("*.dcm"))
    assert len(written) == files  # the CT series and, with them, their SEG
    assert all(profile_problems(pydicom.dcmread(p)) == [] for p in written)
    volumes, report = labelled_volumes(
        out, tmp_path / "c", options=PrepareOptions(require_deidentified=True, on_phi="refuse")
    )
    assert report.problems == [] and len(volumes) == 2
    # The identified copy staged from the PACS is gone from the site's state.
    assert not (state / "deid" / "incoming").exists()


def test_a_site_policy_decides_on_private_attributes_and_failures(consortium, tmp_path, capsys):
    root, _ = consortium
    site = _copy_site(root, tmp_path)
    victim = sorted(_series_folders(site)[0].glob("2.25.*.dcm"))[0]
    ds = pydicom.dcmread(victim)
    _private(ds)
    ds.save_as(victim)
    state = tmp_path / "state"
    policy = ["site", "data-policy", "--state", str(state)]
    prepare = ["site", "prepare", "--source", str(site), "--state", str(state), "-q"]

    assert main([*policy, "--private-tags", "keep"]) == 0
    assert "a file that is not: quarantine; private attributes: keep" in capsys.readouterr().out
    assert main([*prepare, "--output", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "quarantine.json").read_text()) == []

    assert main([*policy, "--private-tags", "remove"]) == 0
    assert main([*prepare, "--output", str(tmp_path / "b")]) == 0
    left_out = json.loads((tmp_path / "b" / "quarantine.json").read_text())
    assert len(left_out) == SLICES + 1

    assert main([*policy, "--on-phi", "refuse"]) == 0
    capsys.readouterr()
    assert main([*prepare, "--output", str(tmp_path / "c")]) == 2
    assert "medfed site deidentify" in capsys.readouterr().err
