"""Header scan: every file becomes an `Instance` (facts, no pixels) or a `Problem`.

The scan reads headers only (pixel data is deferred, never decoded), so a site's whole
archive is classified before any pixel is touched. It never writes to the source.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from federation.dicom.fastheader import read_fast_header
from federation.dicom.profile import profile_problems

__all__ = [
    "RTSTRUCT_SOP_CLASS",
    "SEG_SOP_CLASS",
    "Instance",
    "Problem",
    "ScanResult",
    "iter_files",
    "patient_key",
    "scan_file",
    "scan_paths",
]

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
_UNDEFINED = 0xFFFFFFFF
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel, Float, Double Float Pixel Data


@dataclass(frozen=True)
class Problem:
    """A file that was not used, and the specific reason."""

    path: str
    reason: str


@dataclass
class Instance:
    """Header facts of one DICOM file, gathered without decoding pixels.

    `kind` is "image", "seg" or "rtstruct". Geometry is per frame: a single-frame image
    has one position; an enhanced multi-frame object one per frame.
    """

    path: str
    size: int
    mtime_ns: int
    kind: str
    sop_uid: str
    series_uid: str
    study_uid: str
    patient_key: str
    modality: str
    manufacturer: str
    transfer_syntax: str
    rows: int = 0
    columns: int = 0
    frames: int = 1
    samples: int = 1
    bits_allocated: int = 16
    pixel_representation: int = 0
    pixel_offset: int = -1  # byte offset of native pixel data in the file, -1 if encapsulated
    positions: list[list[float]] = field(default_factory=list)
    orientations: list[list[float]] = field(default_factory=list)
    pixel_spacing: list[float] = field(default_factory=list)
    slopes: list[float] = field(default_factory=list)
    intercepts: list[float] = field(default_factory=list)
    references: list[str] = field(default_factory=list)  # series UIDs a SEG/RTSTRUCT labels
    # Why the file is not de-identified to PS3.15's Basic Profile (names, never values).
    deid_problems: list[str] = field(default_factory=list)
    content_hash: str = ""  # filled in when the bytes are first read

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for the site-local cache index)."""
        return dict(vars(self))  # every field is JSON-ready; asdict's deep copy is slow

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Instance:
        """Inverse of `to_dict`."""
        return cls(**raw)


@dataclass
class ScanResult:
    """What a header scan found: usable instances and problems, one per bad file."""

    instances: list[Instance]
    problems: list[Problem]


def patient_key(patient_id: str) -> str:
    """A site-local pseudonym for grouping by patient; never the ID itself."""
    return hashlib.sha256(patient_id.encode()).hexdigest()[:16]


def iter_files(root: Path) -> Iterator[Path]:
    """Every regular, non-hidden file under `root`, in a stable order."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def _floats(value: Any) -> list[float]:
    if value is None:
        return []
    if isinstance(value, str | bytes | int | float) or not hasattr(value, "__iter__"):
        return [float(value)]
    return [float(v) for v in value]


def _item(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _functional(ds: Dataset, frame: int, group: str, keyword: str) -> Any:
    """An attribute of one frame from per-frame or shared functional groups."""
    for container, index in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        groups = ds.get(container)
        if not groups or index >= len(groups):
            continue
        item = _item(groups[index], group)
        if item is not None and keyword in item:
            return item.get(keyword)
    return None


def _image_geometry(ds: Any, inst: Instance) -> str | None:
    """Fill per-frame geometry and rescale into `inst`; return a reason if unusable."""
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    if not enhanced:
        if inst.frames > 1:
            return (
                f"multi-frame {inst.modality or 'image'} ({inst.frames} frames) without "
                "per-frame geometry: not a cross-sectional volume"
            )
        missing = [
            k
            for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
            if k not in ds or not ds.get(k)
        ]
        if missing:
            return f"not a cross-sectional image: no {', '.join(missing)}"
        inst.positions = [_floats(ds.ImagePositionPatient)]
        inst.orientations = [_floats(ds.ImageOrientationPatient)]
        inst.pixel_spacing = _floats(ds.PixelSpacing)
        inst.slopes = [float(ds.get("RescaleSlope", 1.0) or 1.0)]
        inst.intercepts = [float(ds.get("RescaleIntercept", 0.0) or 0.0)]
        return None
    for frame in range(inst.frames):
        pos = _functional(ds, frame, "PlanePositionSequence", "ImagePositionPatient")
        ori = _functional(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = _functional(ds, frame, "PixelMeasuresSequence", "PixelSpacing")
        if pos is None or ori is None or spacing is None:
            return f"enhanced multi-frame object without plane geometry for frame {frame + 1}"
        inst.positions.append(_floats(pos))
        inst.orientations.append(_floats(ori))
        if not inst.pixel_spacing:
            inst.pixel_spacing = _floats(spacing)
        slope = _functional(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
        icpt = _functional(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
        inst.slopes.append(float(slope if slope not in (None, "") else 1.0))
        inst.intercepts.append(float(icpt if icpt not in (None, "") else 0.0))
    return None


def _decodable(ds: Any) -> str | None:
    from pydicom.pixels.decoders.base import get_decoder

    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if tsyntax is None:
        return None  # raw dataset: pydicom assumes implicit VR little endian
    if not tsyntax.is_compressed:
        return None
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        return f"undecodable transfer syntax {tsyntax.name} ({tsyntax}): no decoder exists"
    if not decoder.is_available:
        return (
            f"undecodable transfer syntax {tsyntax.name} ({tsyntax}): no installed decoder "
            "(install the pylibjpeg plugins or gdcm)"
        )
    return None


def _references(ds: Dataset) -> list[str]:
    refs = [str(r.SeriesInstanceUID) for r in ds.get("ReferencedSeriesSequence") or []]
    for frame_ref in ds.get("ReferencedFrameOfReferenceSequence") or []:
        for study in frame_ref.get("RTReferencedStudySequence") or []:
            for series in study.get("RTReferencedSeriesSequence") or []:
                refs.append(str(series.SeriesInstanceUID))
    return sorted(set(refs))


def _read_header(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path, defer_size=1024)
    except InvalidDicomError:
        # No preamble: accept a raw dataset only if it really is a DICOM instance.
        ds = pydicom.dcmread(path, defer_size=1024, force=True)
        if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
            raise
        return ds


def scan_file(path: Path) -> Instance | Problem:
    """Classify one file from its header; never raises for bad input."""
    name = str(path)
    try:
        stat = path.stat()
        fast = read_fast_header(name, stat.st_size)
        if fast is not None:
            try:
                return _classify(path, stat, fast)
            except Exception:
                pass
        with warnings.catch_warnings():  # malformed values are judged below, not warned
            warnings.simplefilter("ignore")
            ds = _read_header(path)
    except InvalidDicomError:
        return Problem(name, "not DICOM: no DICM preamble and no DICOM instance header")
    except (EOFError, OSError, ValueError, KeyError, TypeError, OverflowError) as err:
        return Problem(name, f"truncated or corrupt DICOM header: {type(err).__name__}: {err}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _classify(path, stat, ds)
    except Exception as err:  # a malformed header value must not stop the site
        return Problem(name, f"malformed DICOM header: {type(err).__name__}: {err}")


def _classify(path: Path, stat: os.stat_result, ds: Any) -> Instance | Problem:
    """Classify from a pydicom `Dataset` or a `FastHeader` (same interface subset)."""
    name = str(path)
    if "SOPInstanceUID" not in ds:
        return Problem(name, "DICOM without SOPInstanceUID: not a storable instance")
    sop_class = str(ds.get("SOPClassUID", ""))
    series_uid = str(ds.get("SeriesInstanceUID", ""))
    if not series_uid:
        return Problem(name, "no SeriesInstanceUID: cannot be grouped into a series")
    tsyntax = ds.file_meta.get("TransferSyntaxUID", "") if hasattr(ds, "file_meta") else ""
    inst = Instance(
        path=name,
        size=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
        kind="image",
        sop_uid=str(ds.SOPInstanceUID),
        series_uid=series_uid,
        study_uid=str(ds.get("StudyInstanceUID", "")),
        patient_key=patient_key(str(ds.get("PatientID", "") or series_uid)),
        modality=str(ds.get("Modality", "")),
        manufacturer=str(ds.get("Manufacturer", "") or "unknown"),
        transfer_syntax=str(tsyntax),
        deid_problems=profile_problems(ds),
    )
    if sop_class == SEG_SOP_CLASS or sop_class == RTSTRUCT_SOP_CLASS:
        inst.kind = "seg" if sop_class == SEG_SOP_CLASS else "rtstruct"
        inst.references = _references(ds)
        if not inst.references:
            return Problem(name, f"{inst.kind.upper()} references no source series")
        return inst
    pixel_tag = next((t for t in _PIXEL_TAGS if t in ds), None)
    if pixel_tag is None:
        kind = pydicom.uid.UID(sop_class).name if sop_class else "unknown SOP class"
        return Problem(name, f"no pixel data ({kind})")
    raw = ds.get_item(pixel_tag, keep_deferred=True)
    tell = getattr(raw, "value_tell", None)
    value = getattr(raw, "value", None)
    length = int(getattr(raw, "length", 0) or 0) if value is None else len(value)
    if value is not None:
        tell = None  # read in full (small, or undefined length): no offset to reuse
    if length != _UNDEFINED and tell is not None and tell + length > stat.st_size:
        return Problem(
            name, f"truncated: pixel data needs {length} bytes, file ends {stat.st_size - tell} in"
        )
    undecodable = _decodable(ds)
    if undecodable:
        return Problem(name, undecodable)
    inst.rows, inst.columns = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    inst.frames = int(ds.get("NumberOfFrames", 1) or 1)
    inst.samples = int(ds.get("SamplesPerPixel", 1) or 1)
    inst.bits_allocated = int(ds.get("BitsAllocated", 16) or 16)
    inst.pixel_representation = int(ds.get("PixelRepresentation", 0) or 0)
    if inst.samples != 1:
        return Problem(name, f"colour image ({inst.samples} samples per pixel): not a scan volume")
    if not inst.rows or not inst.columns:
        return Problem(name, "no Rows/Columns: pixel data has no shape")
    native = pydicom.uid.UID(tsyntax) in (
        pydicom.uid.ExplicitVRLittleEndian,
        pydicom.uid.ImplicitVRLittleEndian,
    )
    expected = inst.rows * inst.columns * inst.frames * inst.bits_allocated // 8
    if native and pixel_tag == 0x7FE00010 and tell is not None and inst.bits_allocated in (8, 16):
        if length < expected:
            return Problem(name, f"truncated: pixel data has {length} of {expected} bytes")
        inst.pixel_offset = int(tell)
    reason = _image_geometry(ds, inst)
    if reason:
        return Problem(name, reason)
    return inst


def scan_paths(
    paths: Iterable[Path],
    *,
    known: dict[str, Instance] | None = None,
    progress: Callable[[int], None] | None = None,
) -> ScanResult:
    """Scan headers of `paths`; files unchanged since `known` (size, mtime) are not reread.

    Args:
        paths: Files to classify.
        known: Instances from an earlier scan, by path (the cache index).
        progress: Called with 1 per file scanned.

    """
    instances: list[Instance] = []
    problems: list[Problem] = []
    known = known or {}
    for path in paths:
        old = known.get(str(path))
        if old is not None:
            try:
                st = path.stat()
            except OSError:
                st = None
            if st is not None and (st.st_size, st.st_mtime_ns) == (old.size, old.mtime_ns):
                instances.append(old)
                if progress:
                    progress(1)
                continue
        found = scan_file(path)
        (problems if isinstance(found, Problem) else instances).append(found)  # type: ignore[arg-type]
        if progress:
            progress(1)
    return ScanResult(instances, problems)
