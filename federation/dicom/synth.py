"""Synthetic multi-vendor consortium written as real DICOM (CT series + DICOM SEG).

Shapes come from MONAI's synthetic generator; each site differs the way hospitals do:
vendor, stored-value encoding (rescale slope/intercept, signedness), scanner intensity
calibration, noise, in-plane matrix and spacing, slice order and number of patients.
Every series also carries a series-level finding for classification: a hypodense
lesion is present in a site-specific fraction of its patients (`SiteProfile.prevalence`),
listed in `labels.csv` (StudyInstanceUID, SeriesInstanceUID, label) at the top of the
site's folder. Everything is deterministic from the seed.
"""

from __future__ import annotations

import copy
import csv
import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from federation.dicom.classlabels import LABELS_CSV
from federation.dicom.deidentify import Deidentifier, Pseudonyms, parse_profile

__all__ = [
    "ABNORMAL",
    "DEIDENTIFICATION",
    "LABELS_CSV",
    "NORMAL",
    "SiteProfile",
    "generate_consortium",
    "has_lesion",
    "hospital_id",
    "patient_id",
    "phantom",
    "site_profiles",
    "write_site",
]

# (manufacturer, model, rows, field of view mm, slope, intercept, signed)
_VENDORS: tuple[tuple[str, str, int, float, float, float, bool], ...] = (
    ("SIEMENS", "SOMATOM Definition AS", 128, 320.0, 1.0, -1024.0, False),
    ("GE MEDICAL SYSTEMS", "Revolution CT", 112, 360.0, 1.0, -1024.0, True),
    ("Philips", "Brilliance 64", 96, 300.0, 0.5, -1000.0, True),
    ("TOSHIBA", "Aquilion ONE", 120, 340.0, 1.0, 0.0, True),
    ("Canon Medical Systems", "Aquilion Prime SP", 104, 350.0, 1.0, -2048.0, False),
)
_ORG_ROOT = "1.2.826.0.1.3680043.10.1137."  # UID prefix for medfed's synthetic objects
# Series-level class labels written to each site's labels CSV.
ABNORMAL = "abnormal"
NORMAL = "normal"
_LESION_HU = -250.0  # hypodense: well below the soft-tissue background and the structures


@dataclass(frozen=True)
class SiteProfile:
    """How one synthetic hospital acquires and encodes its CT."""

    name: str
    manufacturer: str
    model_name: str
    rows: int
    pixel_spacing: float
    slice_thickness: float
    rescale_slope: float
    rescale_intercept: float
    signed: bool
    hu_scale: float
    hu_offset: float
    noise_hu: float
    descending: bool
    patients: int
    # Fraction of the site's patients whose series shows the lesion (class "abnormal").
    prevalence: float = 0.4


def site_profiles(
    names: Sequence[str], patients_per_site: Sequence[int], *, seed: int
) -> list[SiteProfile]:
    """Deterministic acquisition profiles for the named sites."""
    if not patients_per_site:
        raise ValueError("patients_per_site is empty: give at least one patient count.")
    profiles = []
    for i, name in enumerate(names):
        rng = np.random.default_rng([seed, i, 7])
        vendor, model, rows, fov, slope, intercept, signed = _VENDORS[i % len(_VENDORS)]
        profiles.append(
            SiteProfile(
                name=name,
                manufacturer=vendor,
                model_name=model,
                rows=rows,
                pixel_spacing=round(fov / rows, 4),
                slice_thickness=float(rng.choice([1.5, 2.0, 2.5, 3.0])),
                rescale_slope=slope,
                rescale_intercept=intercept,
                signed=signed,
                hu_scale=float(rng.uniform(0.85, 1.15)),
                hu_offset=float(rng.uniform(-25.0, 25.0)),
                noise_hu=float(rng.uniform(8.0, 30.0)),
                descending=bool(i % 2),
                patients=int(patients_per_site[i % len(patients_per_site)]),
                prevalence=round(float(rng.uniform(0.2, 0.6)), 3),
            )
        )
    return profiles


def _uid(*parts: object) -> str:
    return str(generate_uid(prefix=_ORG_ROOT, entropy_srcs=[str(p) for p in parts]))


# The generator's own pseudonym key: its de-identified output is the same on every machine.
_PSEUDONYMS = Pseudonyms(b"medfed synthetic consortium")
# De-identified as a research export usually is: dates shifted per patient, sex kept.
DEIDENTIFICATION = "basic,retain-long-modified-dates,retain-patient-chars"


def hospital_id(profile: SiteProfile, index: int) -> str:
    """The PatientID of a site's `index`-th patient as the hospital's archive has it."""
    return f"{profile.name.upper()}-P{index + 1:03d}"


def patient_id(profile: SiteProfile, index: int, *, identified: bool = False) -> str:
    """The PatientID written for a site's `index`-th patient (and its folder's name)."""
    original = hospital_id(profile, index)
    return original if identified else _PSEUDONYMS.text("patient", original)


def has_lesion(profile: SiteProfile, index: int, *, seed: int) -> bool:
    """Whether the site's `index`-th patient has the lesion.

    round(prevalence x patients) patients are positive; with four or more patients each
    class keeps at least two, so a site can hold out one of each.
    """
    n = profile.patients
    positives = round(profile.prevalence * n)
    if n >= 4:
        positives = min(max(positives, 2), n - 2)
    order = np.random.default_rng([seed, *profile.name.encode(), 11]).permutation(n)
    return bool(index in set(order[:positives].tolist()))


def _add_lesion(
    hu: np.ndarray, mask: np.ndarray, rng: np.random.Generator, noise_hu: float
) -> None:
    """Paint a hypodense ellipsoid into the background of `hu` (slices, rows, cols)."""
    depth, rows, cols = hu.shape
    r_xy, r_z = max(3.0, rows / 7), max(2.0, depth / 4)
    centre = [
        rng.uniform(r_z, depth - 1 - r_z),
        rng.uniform(r_xy + 2, rows - 3 - r_xy),
        rng.uniform(r_xy + 2, cols - 3 - r_xy),
    ]
    z, y, x = np.ogrid[:depth, :rows, :cols]
    inside = (
        ((z - centre[0]) / r_z) ** 2 + ((y - centre[1]) / r_xy) ** 2 + ((x - centre[2]) / r_xy) ** 2
    ) <= 1.0
    inside &= mask == 0  # the segmented structures stay as they are
    hu[inside] = _LESION_HU + rng.normal(0.0, noise_hu, int(inside.sum()))


def phantom(
    profile: SiteProfile, index: int, *, slices: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth of a patient: HU volume and binary label, both (slices, rows, rows).

    Slice `k` lies at z = k * slice_thickness, whatever order the files are written in.
    The label marks the structures; a patient with `has_lesion` also shows a hypodense
    lesion outside them (the series-level finding, not in the label).
    """
    from monai.data.synthetic import create_test_image_3d

    rng = np.random.RandomState(
        np.random.default_rng([seed, index, *profile.name.encode()]).integers(2**31)
    )

    rad_max = max(3, min(profile.rows // 7, slices // 2 - 1))
    image, labels = create_test_image_3d(
        profile.rows,
        profile.rows,
        slices,
        num_objs=int(rng.randint(6, 13)),
        rad_max=rad_max,
        rad_min=max(2, rad_max // 2),
        noise_max=0.0,
        num_seg_classes=1,
        random_state=rng,
    )
    hu = -50.0 + 200.0 * image  # soft-tissue background, enhancing objects
    hu = hu * profile.hu_scale + profile.hu_offset + rng.normal(0.0, profile.noise_hu, hu.shape)
    hu, mask = np.transpose(hu, (2, 0, 1)), np.transpose(labels > 0, (2, 0, 1)).astype(np.uint8)
    if has_lesion(profile, index, seed=seed):
        lesion_rng = np.random.default_rng([seed, index, *profile.name.encode(), 5])
        hu = np.ascontiguousarray(hu)
        _add_lesion(hu, mask, lesion_rng, profile.noise_hu)
    return hu, mask


def _ct_slice(
    profile: SiteProfile,
    patient: dict[str, str],
    series_uid: str,
    frame_uid: str,
    index: int,
    z: float,
    hu_slice: np.ndarray,
    sop_uid: str,
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.UID(_ORG_ROOT + "1")

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.PatientName = patient["name"]
    ds.PatientID = patient["id"]
    ds.PatientBirthDate = patient["birth_date"]
    ds.PatientSex = patient["sex"]
    ds.StudyInstanceUID = patient["study_uid"]
    ds.StudyDate = patient["study_date"]
    ds.StudyTime = "093000"
    ds.StudyID = "1"
    ds.AccessionNumber = patient["accession"]
    ds.ReferringPhysicianName = ""
    ds.InstitutionName = f"{profile.name} hospital"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 2
    ds.SeriesDescription = "Synthetic CT"
    ds.Modality = "CT"
    ds.Manufacturer = profile.manufacturer
    ds.ManufacturerModelName = profile.model_name
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [
        -profile.rows * profile.pixel_spacing / 2,
        -profile.rows * profile.pixel_spacing / 2,
        round(z, 3),
    ]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceLocation = round(z, 3)
    ds.SliceThickness = profile.slice_thickness
    ds.PixelSpacing = [profile.pixel_spacing, profile.pixel_spacing]
    ds.KVP = 120
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = profile.rows
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = int(profile.signed)
    ds.RescaleSlope = profile.rescale_slope
    ds.RescaleIntercept = profile.rescale_intercept
    ds.RescaleType = "HU"
    dtype = np.int16 if profile.signed else np.uint16
    info = np.iinfo(dtype)
    stored = np.round((hu_slice - profile.rescale_intercept) / profile.rescale_slope)
    ds.PixelData = np.clip(stored, info.min, info.max).astype(dtype).tobytes()
    return ds


def _seg(
    profile: SiteProfile, sources: list[Dataset], mask: np.ndarray, seed: int, pid: str
) -> Dataset:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask.astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=_uid(seed, profile.name, pid, "seg-series"),
        series_number=100,
        sop_instance_uid=_uid(seed, profile.name, pid, "seg"),
        instance_number=1,
        manufacturer="medfed",
        manufacturer_model_name="synthetic-ground-truth",
        software_versions="0.1",
        device_serial_number="0",
    )
    return seg


def _patient_series(
    profile: SiteProfile, p: int, *, slices: int, seed: int
) -> tuple[list[Dataset], Dataset, dict[str, str]]:
    """One patient's CT slices, their SEG, and the study and series UIDs (as acquired)."""
    pid = hospital_id(profile, p)
    hu, mask = phantom(profile, p, slices=slices, seed=seed)
    patient = {
        "name": f"SYNTH^{pid}",
        "id": pid,
        "birth_date": f"19{50 + p % 40:02d}0{1 + p % 9}15",
        "sex": "FM"[p % 2],
        "study_uid": _uid(seed, profile.name, pid, "study"),
        "study_date": (dt.date(2024, 1, 1) + dt.timedelta(days=7 * p)).strftime("%Y%m%d"),
        "accession": f"ACC{seed:03d}{p:05d}",
    }
    series_uid = _uid(seed, profile.name, pid, "ct-series")
    frame_uid = _uid(seed, profile.name, pid, "frame")
    sources = [
        _ct_slice(
            profile,
            patient,
            series_uid,
            frame_uid,
            slices - 1 - k if profile.descending else k,
            k * profile.slice_thickness,
            hu[k],
            _uid(seed, profile.name, pid, "ct", k),
        )
        for k in range(slices)
    ]
    # highdicom shares the sources' data elements: the SEG gets copies, de-identified apart.
    seg = _seg(profile, copy.deepcopy(sources), mask, seed, pid)
    return sources, seg, {"StudyInstanceUID": patient["study_uid"], "SeriesInstanceUID": series_uid}


def write_site(
    profile: SiteProfile, out_dir: Path, *, slices: int, seed: int, identified: bool = False
) -> int:
    """Write one site's patients as CT series with SEG ground truth, and its labels CSV.

    Args:
        profile: The site.
        out_dir: Its folder.
        slices: Slices per series.
        seed: The consortium's seed.
        identified: Write what a hospital archive holds (names, dates, institution,
            original UIDs) instead of its de-identified export (PS3.15 Basic Profile with
            `DEIDENTIFICATION`'s options, as `medfed site deidentify` writes it).

    Returns:
        The number of DICOM files written.

    """
    deidentify = None if identified else Deidentifier(_PSEUDONYMS, parse_profile(DEIDENTIFICATION))
    written = 0
    rows: list[dict[str, str]] = []
    for p in range(profile.patients):
        sources, seg, uids = _patient_series(profile, p, slices=slices, seed=seed)
        folder = out_dir / patient_id(profile, p, identified=identified)
        folder.mkdir(parents=True, exist_ok=True)
        for ds in [*sources, seg]:
            if deidentify is not None:
                deidentify(ds)
            # File names carry no order: readers must sort by geometry.
            name = "seg.dcm" if ds is seg else f"{ds.SOPInstanceUID}.dcm"
            pydicom.dcmwrite(folder / name, ds, enforce_file_format=True)
            written += 1
        if deidentify is not None:
            uids = {k: _PSEUDONYMS.uid(v) for k, v in uids.items()}
        rows.append({**uids, "label": ABNORMAL if has_lesion(profile, p, seed=seed) else NORMAL})
    with (out_dir / LABELS_CSV).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["StudyInstanceUID", "SeriesInstanceUID", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return written


def generate_consortium(
    root: Path,
    *,
    site_names: Sequence[str],
    patients_per_site: Sequence[int],
    slices: int = 20,
    seed: int = 0,
    skip_existing: bool = False,
    identified: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[SiteProfile]:
    """Write a synthetic consortium under `root/<site name>/`.

    Args:
        root: Output folder; each site gets a sub-folder.
        site_names: One name per site.
        patients_per_site: Patients per site, reused cyclically.
        slices: Slices per CT series.
        seed: Seed making the whole consortium reproducible.
        skip_existing: Leave sites whose folder already exists untouched.
        identified: Write the hospitals' archives rather than de-identified exports.
        progress: Called with a line per finished site.

    Returns:
        The profiles of the written sites.

    """
    if slices < 8:
        raise ValueError(f"slices={slices}: series need at least 8 slices.")
    profiles = site_profiles(site_names, patients_per_site, seed=seed)
    for profile in profiles:
        if skip_existing and (root / profile.name).exists():
            continue
        count = write_site(
            profile, root / profile.name, slices=slices, seed=seed, identified=identified
        )
        if progress is not None:
            progress(
                f"{profile.name}: {profile.patients} patients, {count} files "
                f"({profile.manufacturer}, {profile.rows}x{profile.rows} @ "
                f"{profile.pixel_spacing:.2f} mm, noise {profile.noise_hu:.0f} HU, "
                f"lesion prevalence {profile.prevalence:.0%})"
            )
    return profiles
