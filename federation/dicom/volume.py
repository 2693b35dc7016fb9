"""Series geometry checks and volume building (HU, spacing, direction), streamed per series."""

from __future__ import annotations

import hashlib
import io
import mmap
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydicom

from federation.dicom.scan import Instance

__all__ = [
    "Frame",
    "GeometryError",
    "SeriesPlan",
    "Volume",
    "group_series",
    "normalise",
    "plan_series",
    "read_volume",
    "resample",
]

_POSITION_TOLERANCE_MM = 0.01
_READ_THREADS = min(4, os.cpu_count() or 1)
_ORIENTATION_TOLERANCE = 1e-3
_Bytes = bytes | mmap.mmap


class GeometryError(ValueError):
    """A series whose slices do not form one regular volume (the reason is specific)."""


@dataclass(frozen=True)
class Frame:
    """One slice of a series: a file and a frame in it."""

    instance: Instance
    frame: int


@dataclass
class SeriesPlan:
    """Slices of one series sorted along the slice normal, with its geometry."""

    series_uid: str
    instances: list[Instance]
    frames: list[Frame]
    spacing: tuple[float, float, float]  # (slice, row, column) in mm
    origin: np.ndarray
    direction: np.ndarray  # rows: row-, column- and slice-direction unit vectors


@dataclass
class Volume:
    """One series as a volume: intensities (slices, rows, cols) sorted along the normal.

    `hu` is in modality units (HU for CT): int16 where that is exact, else float32.
    """

    series_uid: str
    patient_key: str
    manufacturer: str
    hu: np.ndarray
    spacing: tuple[float, float, float]  # (slice, row, column) in mm
    origin: np.ndarray
    direction: np.ndarray
    sop_uids: list[str]
    modality: str = "CT"
    label: np.ndarray | None = None
    class_label: str | None = None
    study_uid: str = ""
    content_hashes: list[str] = field(default_factory=list)


def group_series(instances: Iterable[Instance]) -> dict[str, list[Instance]]:
    """Image instances grouped by (study, series), keyed by series UID."""
    groups: dict[str, list[Instance]] = defaultdict(list)
    for inst in instances:
        if inst.kind == "image":
            groups[inst.series_uid].append(inst)
    return dict(groups)


def plan_series(instances: list[Instance]) -> SeriesPlan:
    """Sort a series' frames by position along the slice normal and check its geometry.

    Raises:
        GeometryError: Mixed orientations or sizes, duplicate or missing slices, uneven
            spacing, or a single slice.

    """
    frames = [Frame(i, f) for i in instances for f in range(len(i.positions))]
    if len(frames) < 2:
        raise GeometryError("a single slice is not a volume")
    if len({(i.rows, i.columns) for i in instances}) != 1:
        sizes = sorted({(i.rows, i.columns) for i in instances})
        raise GeometryError(f"slices have different sizes {sizes}")
    if len({i.study_uid for i in instances}) != 1:
        raise GeometryError("one series UID spans several studies")
    iops = np.array([f.instance.orientations[f.frame] for f in frames], dtype=np.float64)
    if np.abs(iops - iops[0]).max() > _ORIENTATION_TOLERANCE:
        raise GeometryError("slices have mixed orientations (e.g. a localizer in the series)")
    row_dir, col_dir = iops[0, :3], iops[0, 3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.array([f.instance.positions[f.frame] for f in frames], dtype=np.float64)
    dist = positions @ normal
    order = np.argsort(dist, kind="stable")
    gaps = np.diff(dist[order])
    if np.any(gaps < _POSITION_TOLERANCE_MM):
        raise GeometryError(f"{int(np.sum(gaps < _POSITION_TOLERANCE_MM))} duplicate slices")
    step = float(np.min(gaps))
    if np.ptp(gaps) > max(_POSITION_TOLERANCE_MM, 0.05 * step):
        multiples = gaps / step
        if np.allclose(multiples, np.round(multiples), atol=0.05):
            missing = int(np.round(multiples).sum() - len(gaps))
            raise GeometryError(f"{missing} missing slices (gaps of {step:.3f} mm expected)")
        raise GeometryError(f"uneven slice spacing ({gaps.min():.3f}-{gaps.max():.3f} mm)")
    ps = instances[0].pixel_spacing
    return SeriesPlan(
        series_uid=instances[0].series_uid,
        instances=instances,
        frames=[frames[i] for i in order],
        spacing=(float(np.median(gaps)), float(ps[0]), float(ps[1])),
        origin=positions[order[0]],
        direction=np.stack([row_dir, col_dir, normal]),
    )


def _native_frames(inst: Instance, data: _Bytes) -> np.ndarray:
    dtype = np.dtype(f"<{'i' if inst.pixel_representation else 'u'}{inst.bits_allocated // 8}")
    count = inst.rows * inst.columns * inst.frames
    pixels = np.frombuffer(data, dtype=dtype, count=count, offset=inst.pixel_offset)
    return pixels.reshape(inst.frames, inst.rows, inst.columns)


def _decoded_frames(inst: Instance, data: _Bytes) -> np.ndarray:
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    pixels = np.asarray(ds.pixel_array)
    return pixels.reshape(inst.frames, inst.rows, inst.columns)


def _integral_rescale(plan: SeriesPlan) -> bool:
    """Whether every slice's rescale maps stored integers to integers (CT HU, typically)."""
    return all(
        float(v).is_integer() and abs(v) < 2**15
        for inst in plan.instances
        for v in (*inst.slopes, *inst.intercepts)
    )


class _OutOfRange(Exception):
    """Rescaled values do not fit the int16 output (fall back to float32)."""


def _read_file(inst: Instance) -> tuple[np.ndarray, Callable[[], None]]:
    """The instance's stored frames; reading hashes the file. Returns (frames, release)."""
    with open(inst.path, "rb") as fh:
        if inst.pixel_offset < 0:
            data: _Bytes = fh.read()
            inst.content_hash = hashlib.sha256(data).hexdigest()[:32]
            return _decoded_frames(inst, data), lambda: None
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    inst.content_hash = hashlib.sha256(mapped).hexdigest()[:32]
    try:
        return _native_frames(inst, mapped), mapped.close
    except Exception:
        mapped.close()
        raise


def _rescale(stored: np.ndarray, slope: Any, intercept: Any, *, out: np.ndarray) -> None:
    if slope != 1:
        np.multiply(stored, slope, out=out, casting="unsafe")
        stored = out
    np.add(stored, intercept, out=out, casting="unsafe")


def read_volume(plan: SeriesPlan) -> Volume:
    """Read a planned series' pixels once per file and rescale to modality units (HU).

    Native little-endian pixel data is mapped straight from the file at the offset found
    by the scan; every other transfer syntax is decoded by pydicom (pylibjpeg). When every
    rescale is integral (CT) and the values fit, the volume is int16 (exact, half the
    bytes of float32); otherwise float32.

    Raises:
        ValueError: Pixels cannot be decoded or do not match the header.

    """
    if _integral_rescale(plan):
        try:
            return _read(plan, np.int16)
        except _OutOfRange:
            pass
    return _read(plan, np.float32)


def _read(plan: SeriesPlan, dtype: type[np.generic]) -> Volume:
    first = plan.instances[0]
    out = np.empty((len(plan.frames), first.rows, first.columns), dtype=dtype)
    index = {(id(f.instance), f.frame): k for k, f in enumerate(plan.frames)}
    exact = dtype is np.int16

    def load(inst: Instance) -> None:
        # File reads, hashing and numpy release the GIL: files of a series overlap.
        try:
            pixels, release = _read_file(inst)
        except Exception as err:
            raise ValueError(f"pixels of {inst.path} cannot be decoded: {err}") from err
        try:
            for f in range(inst.frames):
                k, slope, icpt = index[(id(inst), f)], inst.slopes[f], inst.intercepts[f]
                if exact:
                    lo, hi = sorted((int(pixels[f].min()) * slope, int(pixels[f].max()) * slope))
                    if lo + icpt < -(2**15) or hi + icpt >= 2**15:
                        raise _OutOfRange
                    # int32 arithmetic wrapped to int16: exact, since the result fits.
                    _rescale(pixels[f], np.int32(slope), np.int32(icpt), out=out[k])
                else:
                    _rescale(pixels[f], slope, icpt, out=out[k])
        finally:
            del pixels
            release()

    workers = min(_READ_THREADS, len(plan.instances))
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(load, plan.instances))
    else:
        for inst in plan.instances:
            load(inst)
    hashes = {inst.sop_uid: inst.content_hash for inst in plan.instances}
    sop_uids = []
    for fr in plan.frames:
        if fr.instance.frames == 1:
            sop_uids.append(fr.instance.sop_uid)
        else:
            sop_uids.append(f"{fr.instance.sop_uid}#{fr.frame + 1}")
    return Volume(
        series_uid=plan.series_uid,
        patient_key=first.patient_key,
        manufacturer=first.manufacturer,
        hu=out,
        spacing=plan.spacing,
        origin=plan.origin,
        direction=plan.direction,
        sop_uids=sop_uids,
        modality=first.modality,
        study_uid=first.study_uid,
        content_hashes=[hashes[i.sop_uid] for i in plan.instances],
    )


def normalise(hu: np.ndarray, *, modality: str, window: tuple[float, float] | None) -> np.ndarray:
    """Modality-aware intensity normalisation to [0, 1].

    CT uses a fixed HU window (the default soft-tissue window -160..240 HU when `window`
    is None); other modalities have no absolute scale, so they are scaled per volume
    between the 0.5th and 99.5th percentiles.
    """
    from monai.transforms import ScaleIntensityRange, ScaleIntensityRangePercentiles, Transform

    if modality == "CT":
        lo, hi = window or (-160.0, 240.0)
        scaler: Transform = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    else:
        scaler = ScaleIntensityRangePercentiles(
            lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True
        )
    return np.asarray(scaler(hu), dtype=np.float32)


def resample(volume: Volume, *, spacing: tuple[float, float, float]) -> Volume:
    """Resample image (trilinear) and label (nearest) to a target (slice, row, col) spacing."""
    import torch
    import torch.nn.functional as F

    factor = np.asarray(volume.spacing) / np.asarray(spacing)

    size = [max(1, round(n * f)) for n, f in zip(volume.hu.shape, factor, strict=True)]
    image = torch.from_numpy(np.asarray(volume.hu, dtype=np.float32))[None, None]
    hu = F.interpolate(image, size=size, mode="trilinear")
    volume.hu = hu[0, 0].numpy()
    if volume.label is not None:
        lab = F.interpolate(torch.from_numpy(volume.label)[None, None].float(), size=size)
        volume.label = lab[0, 0].numpy().astype(np.uint8)
    volume.spacing = spacing
    return volume
