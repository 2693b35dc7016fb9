"""The model at a site: new series in, DICOM SEG / SR out, to disk and a real Orthanc PACS."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from client.governance import AuditLog
from federation.compose import compose_config
from federation.dicom.results import read_probabilities
from federation.dicom.scan import scan_paths
from federation.dicom.volume import group_series, plan_series, read_volume
from federation.modelpack import ModelCard, ModelPackage
from federation.models import build_model
from federation.security import load_public_key
from federation.tasks import get_task
from medfed.cli import main
from tests.orthanc import Pacs, running_orthanc

CARD = ModelCard("medfed-test", "7", "run-a", 3, "c0ffee" * 10 + "abcd")


def _package(tmp: Path, *overrides: str) -> Path:
    cfg = compose_config(["task.image_size=32", *overrides])
    network = build_model(cfg.model, seed=11)
    package = ModelPackage(cfg.task, cfg.model, network.state_dict(), CARD)
    return package.save(tmp / "model.medfed.pt")


@pytest.fixture(scope="module")
def seg_model(tmp_path_factory) -> Path:
    return _package(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, consortium) -> Iterator[Pacs]:
    """Orthanc holding site-2's images (not its ground truth)."""
    root, _ = consortium
    images = tmp_path_factory.mktemp("images")
    for path in (root / "site-2").rglob("*.dcm"):
        if pydicom.dcmread(path, stop_before_pixels=True).Modality == "CT":
            shutil.copy(path, images / path.name)
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as orthanc:
        assert orthanc.c_store(images) == len(list(images.glob("*.dcm")))
        yield orthanc


def _series(folder: Path) -> dict[str, tuple]:
    """Each CT series of a folder: its plan and volume, by series UID."""
    scan = scan_paths(sorted(folder.rglob("*.dcm")))
    out = {}
    for uid, insts in group_series(scan.instances).items():
        plan = plan_series(insts)
        out[uid] = (plan, read_volume(plan))
    return out


def _check_seg(path: Path, plan, volume, package: ModelPackage) -> np.ndarray:
    """The SEG references the series and its instances on their geometry; its mask."""
    seg = hd.seg.segread(path)
    (ref,) = seg.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == volume.series_uid
    assert {i.ReferencedSOPInstanceUID for i in ref.ReferencedInstanceSequence} == set(
        volume.sop_uids
    )
    assert seg.StudyInstanceUID == plan.instances[0].study_uid
    assert (seg.Rows, seg.Columns) == volume.hu.shape[1:]
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        instance = next(i for i in plan.instances if i.sop_uid == source.ReferencedSOPInstanceUID)
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose([float(v) for v in position], instance.positions[0], atol=1e-3)
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("medfed-test", "7")
    assert "config_sha256=" + CARD.config_sha256 in algorithm.AlgorithmParameters
    assert seg.SegmentSequence[0].SegmentLabel == "lesion"
    mask = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=volume.sop_uids,
        combine_segments=True,
        assert_missing_frames_are_empty=True,
    )
    expected = get_task("seg2d").infer(package.build(), volume, package.task).mask
    np.testing.assert_array_equal(np.asarray(mask) > 0, expected.astype(bool))
    return expected


def test_a_folder_gets_one_seg_per_series_equal_to_the_models_prediction(
    consortium, seg_model, tmp_path
):
    root, _ = consortium
    state = tmp_path / "state"
    state.mkdir()
    out = tmp_path / "out"
    args = ["site", "predict", "--model", str(seg_model), "--source", str(root / "site-1")]
    assert main([*args, "--output", str(out), "--nifti", "--state", str(state)]) == 0
    results = json.loads((out / "predictions.json").read_text())["results"]
    series = _series(root / "site-1")
    assert {r["series_uid"] for r in results} == set(series) and len(series) == 3
    package = ModelPackage.load(seg_model)
    masks = []
    for r in results:
        assert r["kind"] == "SEG" and not r["stored"]
        plan, volume = series[r["series_uid"]]
        masks.append(_check_seg(Path(r["path"]), plan, volume, package))
        assert (Path(r["path"]).parent / "mask.nii.gz").exists()
    assert 0 < np.mean(np.concatenate([m.ravel() for m in masks])) < 1  # not a trivial mask
    assert json.loads((out / "quarantine.json").read_text()) == []
    # The use is in the site's signed audit log, without patient or series identifiers.
    log = AuditLog(state / "audit.jsonl", None, "state")
    assert log.verify(load_public_key(state / "site_key.pub")) == []
    (entry,) = log.entries()
    assert entry["action"] == "model-used"
    assert entry["details"] | {"series": 3} == {
        "model": "medfed-test", "version": "7", "run": "run-a", "series": 3,
        "quarantined_files": 0, "stored": "",
    }  # fmt: skip
    text = (state / "audit.jsonl").read_text()
    assert not any(uid in text for uid in series)


@pytest.mark.parametrize("scheme", ["dicomweb", "dimse"])
def test_round_trip_through_orthanc(pacs, consortium, seg_model, tmp_path, scheme):
    root, _ = consortium
    address = {"dicomweb": pacs.dicomweb, "dimse": pacs.dimse}[scheme]
    out = tmp_path / "out"
    args = ["site", "predict", "--model", str(seg_model), "--source", address]
    assert main([*args, "--output", str(out), "--store-to", address, "--modality", "CT"]) == 0
    results = json.loads((out / "predictions.json").read_text())["results"]
    series = _series(root / "site-2")
    assert {r["series_uid"] for r in results} == set(series)
    client = DICOMwebClient(url=f"http://127.0.0.1:{pacs.http}/dicom-web")
    package = ModelPackage.load(seg_model)
    for r in results:
        assert r["stored"]
        stored = client.retrieve_instance(r["study_uid"], _seg_series(client, r), r["sop_uid"])
        back = tmp_path / f"{r['sop_uid']}.dcm"
        stored.save_as(back, enforce_file_format=True)
        plan, volume = series[r["series_uid"]]
        _check_seg(back, plan, volume, package)


def _seg_series(client: DICOMwebClient, result: dict) -> str:
    found = client.search_for_instances(
        study_instance_uid=result["study_uid"],
        search_filters={"SOPInstanceUID": result["sop_uid"]},
    )
    assert len(found) == 1, found
    return str(found[0]["0020000E"]["Value"][0])


def test_classification_writes_an_sr_per_series_with_probabilities(labelled_consortium, tmp_path):
    root, _ = labelled_consortium
    model = _package(tmp_path, "task=classify", "task.image_size=32")
    out = tmp_path / "out"
    args = ["site", "predict", "--model", str(model), "--source", str(root / "site-1")]
    assert main([*args, "--output", str(out)]) == 0
    results = json.loads((out / "predictions.json").read_text())["results"]
    assert len(results) == 4
    for r in results:
        sr = hd.sr.srread(r["path"])
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
        assert sr.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID == r["study_uid"]
        probabilities = read_probabilities(sr)
        assert set(probabilities) == {"normal", "abnormal"}
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-9)
        assert probabilities == pytest.approx(r["probabilities"])
    header = (out / "predictions.csv").read_text().splitlines()[0]
    assert header == "study_uid,series_uid,kind,file,abnormal,normal"


def test_junk_and_a_series_of_another_modality_are_quarantined(consortium, seg_model, tmp_path):
    root, _ = consortium
    folder = tmp_path / "data"
    shutil.copytree(root / "site-1", folder)
    (folder / "junk.dcm").write_bytes(b"not a DICOM file at all")
    mr_series = None
    for path in sorted(folder.rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            continue
        if ds.Modality == "CT" and mr_series in (None, ds.SeriesInstanceUID):
            mr_series = ds.SeriesInstanceUID
            ds.Modality = "MR"
            ds.save_as(path)
    out = tmp_path / "out"
    args = ["site", "predict", "--model", str(seg_model), "--source", str(folder)]
    assert main([*args, "--output", str(out)]) == 0
    results = json.loads((out / "predictions.json").read_text())["results"]
    assert len(results) == 2 and mr_series not in {r["series_uid"] for r in results}
    reasons = {Path(p["path"]).name: p["reason"] for p in json.loads(
        (out / "quarantine.json").read_text()
    )}  # fmt: skip
    assert reasons["junk.dcm"].startswith("not DICOM")
    assert sum(r == "modality MR: the model takes CT series" for r in reasons.values()) > 1
    assert not (out / str(mr_series)).exists()


@pytest.mark.parametrize("scheme", ["dicomweb", "dimse"])
def test_an_unreachable_pacs_stops_before_anything_is_written(
    consortium, seg_model, tmp_path, capsys, scheme
):
    from federation.ports import free_port

    root, _ = consortium
    dest = {
        "dicomweb": f"dicomweb://127.0.0.1:{free_port()}/dicom-web",
        "dimse": f"dimse://ORTHANC@127.0.0.1:{free_port()}",
    }[scheme]
    out = tmp_path / "out"
    args = ["site", "predict", "--model", str(seg_model), "--source", str(root / "site-1")]
    assert main([*args, "--output", str(out), "--store-to", dest]) == 2
    err = capsys.readouterr().err
    assert "medfed: error:" in err and ("does not answer" in err or "no DICOM association" in err)
    assert not out.exists() or not list(out.rglob("*.dcm"))


def test_a_bare_state_dict_is_refused_with_what_to_use(tmp_path, capsys, consortium):
    import torch

    root, _ = consortium
    bare = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(1)}, bare)
    args = ["site", "predict", "--model", str(bare), "--source", str(root / "site-1")]
    assert main([*args, "--output", str(tmp_path / "out")]) == 2
    assert "carries no task or preprocessing" in capsys.readouterr().err
