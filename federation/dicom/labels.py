"""Labels on a volume's grid: DICOM SEG, RTSTRUCT contours, NIfTI masks, CSV class labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from federation.dicom.volume import Volume

__all__ = [
    "NIFTI_SUFFIXES",
    "is_nifti",
    "nifti_label",
    "rtstruct_label",
    "seg_label",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    """Whether `path` names a NIfTI file."""
    return path.name.endswith(NIFTI_SUFFIXES)


def seg_label(path: str, volume: Volume) -> np.ndarray:
    """Binary mask (all segments combined) of a DICOM SEG on the volume's slices.

    Raises:
        ValueError: The SEG does not reference the volume's instances.

    """
    import highdicom as hd

    seg = hd.seg.segread(path)
    if all("#" in u for u in volume.sop_uids):  # enhanced multi-frame source
        sop = volume.sop_uids[0].split("#")[0]
        pixels = seg.get_pixels_by_source_frame(
            source_sop_instance_uid=sop,
            source_frame_numbers=[int(u.split("#")[1]) for u in volume.sop_uids],
            combine_segments=True,
            assert_missing_frames_are_empty=True,
        )
    else:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=volume.sop_uids,
            combine_segments=True,
            assert_missing_frames_are_empty=True,
        )
    return (np.asarray(pixels) > 0).astype(np.uint8)


def _to_voxels(points_lps: np.ndarray, volume: Volume) -> np.ndarray:
    """(N, 3) patient points to (N, 3) fractional (slice, row, col) indices."""
    rel = points_lps - volume.origin
    row_dir, col_dir, normal = volume.direction
    dz, dr, dc = volume.spacing
    return np.stack([rel @ normal / dz, rel @ col_dir / dr, rel @ row_dir / dc], axis=1)


def rtstruct_label(path: str, volume: Volume) -> np.ndarray:
    """Rasterise every closed planar contour of an RTSTRUCT onto the volume's grid.

    Raises:
        ValueError: No contour lies on the volume's slices.

    """
    import pydicom
    from PIL import Image, ImageDraw

    ds = pydicom.dcmread(path)
    depth, rows, cols = volume.hu.shape
    planes = [Image.new("L", (cols, rows), 0) for _ in range(depth)]
    drawn = 0
    for roi in ds.get("ROIContourSequence") or []:
        for contour in roi.get("ContourSequence") or []:
            if str(contour.get("ContourGeometricType", "")) not in ("CLOSED_PLANAR", ""):
                continue
            points = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)
            vox = _to_voxels(points, volume)
            k = round(float(np.median(vox[:, 0])))
            if not 0 <= k < depth or len(points) < 3:
                continue
            ImageDraw.Draw(planes[k]).polygon(
                [(float(c), float(r)) for r, c in vox[:, 1:]], fill=1, outline=1
            )
            drawn += 1
    if not drawn:
        raise ValueError("RTSTRUCT has no closed contour on the series' slices")
    return np.stack([np.asarray(p, dtype=np.uint8) for p in planes])


def nifti_label(path: Path, volume: Volume) -> np.ndarray:
    """Sample a NIfTI mask (nearest neighbour, via its affine) on the volume's grid.

    Raises:
        ValueError: The mask does not cover the volume.

    """
    import nibabel as nib

    img: Any = nib.load(str(path))
    data = np.asarray(img.dataobj)
    while data.ndim > 3:
        data = data[..., 0]
    depth, rows, cols = volume.hu.shape
    s, r, c = np.meshgrid(np.arange(depth), np.arange(rows), np.arange(cols), indexing="ij")
    row_dir, col_dir, normal = volume.direction
    dz, dr, dc = volume.spacing
    lps = (
        volume.origin
        + (c.reshape(-1, 1) * dc) * row_dir
        + (r.reshape(-1, 1) * dr) * col_dir
        + (s.reshape(-1, 1) * dz) * normal
    )
    ras = lps * np.array([-1.0, -1.0, 1.0])
    inv = np.linalg.inv(img.affine)
    ijk = np.rint(ras @ inv[:3, :3].T + inv[:3, 3]).astype(np.int64)
    inside = np.all((ijk >= 0) & (ijk < np.array(data.shape[:3])), axis=1)
    if inside.mean() < 0.99:
        raise ValueError(
            f"NIfTI mask {path.name} covers only {100 * inside.mean():.0f}% of the series"
        )
    ijk = np.clip(ijk, 0, np.array(data.shape[:3]) - 1)
    values = data[ijk[:, 0], ijk[:, 1], ijk[:, 2]]
    return (values.reshape(depth, rows, cols) > 0).astype(np.uint8)
