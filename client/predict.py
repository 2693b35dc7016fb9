"""The trained model at a site: new studies in, DICOM SEG or SR out, to disk and the PACS.

`medfed site predict` reads a folder or the hospital PACS, checks every series as the
training pipeline does (headers, the site's PHI policy, series geometry, decodable
pixels, modality), preprocesses it with the task's own code, and writes one DICOM
result per series: a SEG for a segmentation task, a Comprehensive 3D SR with the class
probabilities for classification. Series are streamed one at a time (memory does not
grow with their number). A series the model cannot take is quarantined with its reason
and gets no result. With a destination, each result is stored to it as it is made,
after the destination answered; the site's signed audit log records the use of the
model (which model, how many series; no patient identifiers).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from client.governance import AuditLog
from client.prepare import DataPolicy
from federation.dicom.classlabels import LABELS_CSV
from federation.dicom.labels import is_nifti
from federation.dicom.results import classification_report, segmentation
from federation.dicom.scan import Instance, Problem, iter_files, scan_paths
from federation.dicom.sources import INCOMING_DIR, SourceQuery, fetch_source, open_destination
from federation.dicom.volume import GeometryError, SeriesPlan, Volume, group_series, plan_series
from federation.dicom.volume import read_volume as read_series
from federation.logs import context_logger
from federation.modelpack import ModelCard, ModelPackage
from federation.tasks import get_task
from federation.tasks.base import Prediction, Task

__all__ = ["STAGES", "PredictReport", "SeriesResult", "predict", "record_use"]

# The stages timed separately (seconds each, in `PredictReport.seconds`).
STAGES = ("decode", "model", "encode", "store")
RESULTS_FILE = "predictions.json"
TABLE_FILE = "predictions.csv"
QUARANTINE_FILE = "quarantine.json"


@dataclass(frozen=True)
class SeriesResult:
    """One series' result: where it was written, and for classification the probabilities."""

    series_uid: str
    study_uid: str
    kind: str  # "SEG" or "SR"
    path: str
    sop_uid: str
    slices: int
    probabilities: dict[str, float] | None = None
    stored: bool = False


@dataclass
class PredictReport:
    """What a prediction run produced, left out, and how long each stage took."""

    model: str
    results: list[SeriesResult] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    @property
    def slices(self) -> int:
        """Slices of the series that got a result."""
        return sum(r.slices for r in self.results)

    def write(self, output: Path) -> None:
        """`predictions.json`, `predictions.csv` and `quarantine.json` in `output`."""
        output.mkdir(parents=True, exist_ok=True)
        (output / RESULTS_FILE).write_text(
            json.dumps(
                {
                    "model": self.model,
                    "results": [asdict(r) for r in self.results],
                    "seconds": self.seconds,
                },
                indent=1,
            )
        )
        (output / QUARANTINE_FILE).write_text(
            json.dumps([asdict(p) for p in self.problems], indent=1)
        )
        classes = sorted({c for r in self.results for c in (r.probabilities or {})})
        with (output / TABLE_FILE).open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["study_uid", "series_uid", "kind", "file", *classes])
            for r in self.results:
                probs = r.probabilities or {}
                cells = [probs.get(c, "") for c in classes]
                writer.writerow([r.study_uid, r.series_uid, r.kind, r.path, *cells])


@contextlib.contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    """Add the time spent in the block to the stage's total."""
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] += time.perf_counter() - started


def _sources(plan: SeriesPlan) -> list[Dataset]:
    """The series' images as the result references them: headers, in volume order."""
    paths = dict.fromkeys(f.instance.path for f in plan.frames)
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


def _mask_frames(mask: np.ndarray, plan: SeriesPlan) -> np.ndarray:
    """The mask in the order of the source frames (a multi-frame image keeps its own)."""
    if len(plan.instances) > 1 or len(plan.frames) == 1:
        return mask
    ordered = np.zeros_like(mask)
    for index, frame in enumerate(plan.frames):
        ordered[frame.frame] = mask[index]
    return ordered


def _checked_series(
    instances: list[Instance], task: Task, report: PredictReport
) -> Iterator[tuple[SeriesPlan, Volume]]:
    """Each series the task can take, as its plan and volume; the rest quarantined."""
    for uid, insts in sorted(group_series(instances).items()):
        modality = insts[0].modality
        reason = None
        if modality != task.modality:
            reason = f"modality {modality}: the model takes {task.modality} series"
        else:
            try:
                plan = plan_series(insts)
                yield plan, read_series(plan)
                continue
            except GeometryError as err:
                reason = f"inconsistent series geometry: {err}"
            except ValueError as err:
                reason = f"undecodable pixel data: {err}"
        report.problems.extend(Problem(i.path, reason) for i in insts)
        context_logger().warning("series %s left out: %s", uid, reason)


def predict(
    package: ModelPackage,
    source: str,
    output: Path,
    *,
    store_to: str | None = None,
    state_dir: Path | None = None,
    query: SourceQuery | None = None,
    nifti: bool = False,
) -> PredictReport:
    """Apply a model to every series of `source`; write (and store) one result per series.

    Args:
        package: The model, with its task and preprocessing.
        source: A folder, `dicomweb://...` or `dimse://AET@host:port`.
        output: Where results, the tables and the quarantine list are written.
        store_to: A PACS to store each result to (checked before any series is read).
        state_dir: The site's state folder: its data policy (PHI) applies.
        query: Which series to take from a PACS.
        nifti: Also write each mask as NIfTI.

    Raises:
        ConnectionError: The source or the destination PACS cannot be reached; nothing
            was stored.
        DeidentificationRequired: The site's policy refuses data that is not
            de-identified, and files are not.
        ValueError: The source is not a folder or a PACS address.
    """
    task = get_task(package.task.name)
    model = package.build()
    report = PredictReport(model=package.card.title)
    log = context_logger()
    destination = open_destination(store_to) if store_to else None
    with destination if destination is not None else contextlib.nullcontext() as pacs:
        folder = fetch_source(source, output / INCOMING_DIR, query=query)
        # As in training: the labels CSV and NIfTI masks beside the DICOM are not images.
        scan = scan_paths(p for p in iter_files(folder) if p.name != LABELS_CSV and not is_nifti(p))
        report.problems.extend(scan.problems)
        policy = DataPolicy.load(state_dir) if state_dir is not None else DataPolicy()
        instances = policy.options().gate(scan.instances, report.problems)
        series = _checked_series(instances, task, report)
        while True:
            with _timed(report.seconds, "decode"):
                item = next(series, None)
            if item is None:
                break
            plan, volume = item
            try:
                with _timed(report.seconds, "model"):
                    prediction = task.infer(model, volume, package.task)
            except ValueError as err:
                report.problems.extend(Problem(i.path, str(err)) for i in plan.instances)
                continue
            with _timed(report.seconds, "encode"):
                result, ds = _encode(prediction, plan, volume, package, task, output, nifti=nifti)
            if pacs is not None:
                with _timed(report.seconds, "store"):
                    pacs.store(ds)
                result = dataclasses.replace(result, stored=True)
            report.results.append(result)
            log.info(
                "series %d: %s written%s", len(report.results), result.kind,
                " and stored" if result.stored else "",
            )  # fmt: skip
    report.write(output)
    return report


def _encode(
    prediction: Prediction,
    plan: SeriesPlan,
    volume: Volume,
    package: ModelPackage,
    task: Task,
    output: Path,
    *,
    nifti: bool,
) -> tuple[SeriesResult, Dataset]:
    """The series' DICOM result, written under `output/<series UID>/`."""
    sources = _sources(plan)
    folder = output / volume.series_uid
    folder.mkdir(parents=True, exist_ok=True)
    if prediction.mask is not None:
        assert task.segment is not None
        ds = segmentation(_mask_frames(prediction.mask, plan), sources, package.card, task.segment)
        kind = "SEG"
        if nifti:
            _write_nifti(prediction.mask, volume, folder / "mask.nii.gz")
    else:
        assert prediction.probabilities is not None
        ds = classification_report(prediction.probabilities, sources, package.card)
        kind = "SR"
    path = folder / f"{kind.lower()}.dcm"
    ds.save_as(path, enforce_file_format=True)
    result = SeriesResult(
        series_uid=volume.series_uid,
        study_uid=volume.study_uid or str(sources[0].StudyInstanceUID),
        kind=kind,
        path=str(path),
        sop_uid=str(ds.SOPInstanceUID),
        slices=int(volume.hu.shape[0]),
        probabilities=prediction.probabilities,
    )
    return result, ds


def _write_nifti(mask: np.ndarray, volume: Volume, path: Path) -> None:
    """The mask as NIfTI in the scanner's frame (RAS affine from the series geometry)."""
    import nibabel as nib

    row_dir, col_dir, normal = volume.direction
    dz, dr, dc = volume.spacing
    affine = np.eye(4)
    # voxel (col, row, slice) -> LPS, then LPS -> RAS.
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = row_dir * dc, col_dir * dr, normal * dz
    affine[:3, 3] = volume.origin
    affine[:2] *= -1
    nib.save(nib.Nifti1Image(np.transpose(mask, (2, 1, 0)).astype(np.uint8), affine), str(path))


def record_use(
    audit: AuditLog, card: ModelCard, report: PredictReport, *, by: str, stored_to: str | None
) -> dict[str, Any]:
    """Sign the use of a model into the site's audit log: which model, how many series.

    No patient, study or series identifiers are written, and no PACS address.
    """
    return audit.append(
        "model-used",
        plan="",
        by=by,
        model=card.name,
        version=card.version,
        run=card.run,
        series=len(report.results),
        quarantined_files=len(report.problems),
        stored=stored_to.split("://", 1)[0] if stored_to else "",
    )
