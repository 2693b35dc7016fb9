"""Privacy gate: which attributes carry PHI, and whether a site's files are de-identified.

Nothing that leaves a site (metrics, manifests sent as summaries, quality summaries,
refusals) may carry the values of these attributes; the site-local manifest keeps only
pseudonyms and facts about geometry, vendor and labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pydicom.dataset import Dataset

__all__ = [
    "PHI_KEYWORDS",
    "DeidentificationRequired",
    "identifying_values",
    "phi_attributes",
    "require_deidentified",
]

# Patient identity, dates that date a patient, institution and staff, free text.
PHI_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientMotherBirthName",
    "MilitaryRank",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "AcquisitionDateTime",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "StationName",
    "DeviceSerialNumber",
    "RequestingPhysician",
    "AdditionalPatientHistory",
    "PatientComments",
)
# UIDs can embed identifiers (dates, MRNs): they never leave a site in clear.
UID_KEYWORDS: tuple[str, ...] = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
)


def phi_attributes(ds: Any) -> list[str]:
    """Keywords of PHI-bearing attributes with a value in `ds` (plus "private tags")."""
    found = [k for k in PHI_KEYWORDS if k in ds and str(ds.get(k) or "").strip()]
    if any((int(tag) >> 16) & 1 for tag in ds.keys()):  # odd group: private; no deferred reads
        found.append("private tags")
    return found


def identifying_values(ds: Dataset) -> set[str]:
    """The identifying strings of one dataset (for scanning what a site sends)."""
    values = {str(ds.get(k) or "").strip() for k in (*PHI_KEYWORDS, *UID_KEYWORDS)}
    return {v for v in values if len(v) >= 4}


class DeidentificationRequired(ValueError):
    """The site's policy requires de-identified data and these files are not."""

    def __init__(self, files: Sequence[str], reasons: Sequence[str]) -> None:
        """Name the files and why each is not de-identified."""
        self.files = list(files)
        self.reasons = list(reasons)
        super().__init__(self.files, self.reasons)

    def __str__(self) -> str:
        shown = "; ".join(
            f"{f}: {r}" for f, r in list(zip(self.files, self.reasons, strict=True))[:5]
        )
        more = f" and {len(self.files) - 5} more" if len(self.files) > 5 else ""
        return (
            f"the site policy requires de-identified data, but {len(self.files)} files are "
            f"not: {shown}{more}. De-identify them (PatientIdentityRemoved=YES, PHI blanked) "
            "or set require_deidentified: false in the site policy."
        )


def require_deidentified(files: Iterable[tuple[str, bool, Sequence[str]]]) -> None:
    """Refuse unless every (path, PatientIdentityRemoved, PHI attributes) is de-identified.

    Raises:
        DeidentificationRequired: Naming each file that is not and why.

    """
    bad, reasons = [], []
    for path, removed, phi in files:
        why = []
        if not removed:
            why.append("PatientIdentityRemoved is not YES")
        if phi:
            why.append(f"carries {', '.join(phi)}")
        if why:
            bad.append(path)
            reasons.append(" and ".join(why))
    if bad:
        raise DeidentificationRequired(bad, reasons)
