"""Read a site's DICOM folder into geometry-correct volumes with SEG labels."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

__all__ = [
    "Problem",
    "SeriesHeader",
    "Volume",
    "load_labelled_volumes",
    "load_volume",
    "scan_folder",
]

_SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
_POSITION_TOLERANCE_MM = 0.01


@dataclass(frozen=True)
class Problem:
    """A file or series that was not used, and why."""

    path: str
    reason: str


@dataclass
class SeriesHeader:
    """Header facts of one image series, gathered without reading pixels."""

    series_uid: str
    study_uid: str
    patient_key: str
    modality: str
    manufacturer: str
    files: list[Path] = field(default_factory=list)
    sop_uids: list[str] = field(default_factory=list)
    positions: list[np.ndarray] = field(default_factory=list)
    orientations: list[tuple[float, ...]] = field(default_factory=list)
    pixel_spacing: tuple[float, float] = (1.0, 1.0)


@dataclass
class Volume:
    """One series as a volume: HU (slices, rows, cols) sorted along the slice normal."""

    series_uid: str
    patient_key: str
    manufacturer: str
    hu: np.ndarray
    spacing: tuple[float, float, float]  # (slice, row, column) in mm
    origin: np.ndarray
    direction: np.ndarray  # rows: column-, row- and slice-direction unit vectors
    sop_uids: list[str]
    label: np.ndarray | None = None
    # Series- or study-level class from the site's labels CSV (federation.dicom.classlabels).
    class_label: str | None = None
    study_uid: str = ""


@dataclass
class ScanResult:
    """What a header scan of a folder found."""

    series: dict[str, SeriesHeader]
    segs: dict[str, list[Path]]  # referenced image series UID -> SEG files
    problems: list[Problem]


def _patient_key(patient_id: str) -> str:
    """A site-local pseudonym for grouping slices by patient; never the ID itself."""
    return hashlib.sha256(patient_id.encode()).hexdigest()[:16]


def _files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.startswith(".") and path.name != "labels.csv":
            yield path


def scan_folder(root: Path) -> ScanResult:
    """Read headers (no pixels) of every file under `root` and group them by series."""
    series: dict[str, SeriesHeader] = {}
    segs: dict[str, list[Path]] = defaultdict(list)
    problems: list[Problem] = []
    for path in _files(root):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, EOFError, OSError, ValueError) as err:
            problems.append(Problem(str(path), f"not readable as DICOM: {err}"))
            continue
        if ds.get("SOPClassUID") == _SEG_SOP_CLASS:
            refs = ds.get("ReferencedSeriesSequence") or []
            if not refs:
                problems.append(Problem(str(path), "SEG references no source series"))
            for ref in refs:
                segs[str(ref.SeriesInstanceUID)].append(path)
            continue
        missing = [
            tag
            for tag in (
                "SeriesInstanceUID",
                "ImagePositionPatient",
                "ImageOrientationPatient",
                "PixelSpacing",
                "Rows",
                "Columns",
            )
            if tag not in ds
        ]
        if missing:
            problems.append(
                Problem(str(path), f"not a cross-sectional image: no {', '.join(missing)}")
            )
            continue
        uid = str(ds.SeriesInstanceUID)
        head = series.get(uid)
        if head is None:
            head = series[uid] = SeriesHeader(
                series_uid=uid,
                study_uid=str(ds.get("StudyInstanceUID", "")),
                patient_key=_patient_key(str(ds.get("PatientID", uid))),
                modality=str(ds.get("Modality", "")),
                manufacturer=str(ds.get("Manufacturer", "unknown")),
                pixel_spacing=(float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
            )
        head.files.append(path)
        head.sop_uids.append(str(ds.SOPInstanceUID))
        head.positions.append(np.asarray(ds.ImagePositionPatient, dtype=np.float64))
        head.orientations.append(tuple(round(float(v), 4) for v in ds.ImageOrientationPatient))
    return ScanResult(series=series, segs=dict(segs), problems=problems)


def _slice_order(head: SeriesHeader) -> tuple[np.ndarray, np.ndarray, float]:
    """Sort order along the slice normal, the direction matrix and the slice spacing."""
    if len(set(head.orientations)) != 1:
        raise ValueError("slices have mixed orientations")
    iop = np.asarray(head.orientations[0])
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    dist = np.array([float(np.dot(p, normal)) for p in head.positions])
    order = np.argsort(dist)
    sorted_dist = dist[order]
    if len(sorted_dist) < 2:
        raise ValueError("a single slice is not a volume")
    gaps = np.diff(sorted_dist)
    if np.any(gaps < _POSITION_TOLERANCE_MM):
        raise ValueError("duplicate slice positions")
    if np.ptp(gaps) > max(_POSITION_TOLERANCE_MM, 0.05 * float(np.median(gaps))):
        raise ValueError(
            f"uneven slice spacing ({gaps.min():.3f}-{gaps.max():.3f} mm): slices missing?"
        )
    return order, np.stack([row_dir, col_dir, normal]), float(np.median(gaps))


def load_volume(head: SeriesHeader) -> Volume:
    """Read one series' pixels in geometric order and convert to HU.

    Raises:
        ValueError: The geometry is inconsistent or the pixels cannot be decoded.

    """
    from pydicom.pixels import apply_rescale

    order, direction, dz = _slice_order(head)
    slices = []
    for idx in order:
        ds = pydicom.dcmread(head.files[idx])
        slices.append(np.asarray(apply_rescale(ds.pixel_array, ds), dtype=np.float32))
    shapes = {s.shape for s in slices}
    if len(shapes) != 1:
        raise ValueError(f"slices have different sizes {sorted(shapes)}")
    return Volume(
        series_uid=head.series_uid,
        patient_key=head.patient_key,
        manufacturer=head.manufacturer,
        hu=np.stack(slices),
        spacing=(dz, head.pixel_spacing[0], head.pixel_spacing[1]),
        origin=head.positions[order[0]],
        direction=direction,
        sop_uids=[head.sop_uids[i] for i in order],
        study_uid=head.study_uid,
    )


def _seg_label(seg_path: Path, volume: Volume) -> np.ndarray:
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=volume.sop_uids,
        combine_segments=True,
        assert_missing_frames_are_empty=True,
    )
    return (np.asarray(pixels) > 0).astype(np.uint8)


def load_labelled_volumes(root: Path) -> tuple[list[Volume], list[Problem]]:
    """Load every image series under `root` that has a DICOM SEG label.

    Returns:
        The labelled volumes and the problems of everything not used.

    """
    scan = scan_folder(root)
    problems = list(scan.problems)
    volumes: list[Volume] = []
    for uid, head in sorted(scan.series.items()):
        seg_files = scan.segs.get(uid)
        if not seg_files:
            problems.append(Problem(str(head.files[0].parent), f"series {uid} has no SEG label"))
            continue
        try:
            volume = load_volume(head)
            volume.label = _seg_label(seg_files[0], volume)
        except Exception as err:  # one bad series never stops the site
            problems.append(Problem(str(head.files[0].parent), f"series {uid}: {err}"))
            continue
        volumes.append(volume)
    for uid, paths in scan.segs.items():
        if uid not in scan.series:
            problems.extend(Problem(str(p), f"SEG without its source series {uid}") for p in paths)
    return volumes, problems
