"""PS3.15 Annex E: the Basic Application Level Confidentiality Profile, its options, the gate.

The attribute table (PS3.15 Table E.1-1, edition 2026c) is read from dicom-anonymizer's
database, which tracks the standard's editions; medfed keeps only the actions. The gate
(`profile_problems`) judges a header against the profile and the options the file declares
in its DeidentificationMethodCodeSequence. A reason names the attribute or the rule, never
its value.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement

__all__ = [
    "BASIC",
    "BURNED_IN_MODALITIES",
    "DATE_VRS",
    "OPTIONS",
    "PRIVATE",
    "PSEUDONYM_PREFIX",
    "Option",
    "action",
    "burned_in_problem",
    "declared_options",
    "kept_tags",
    "profile_problems",
]

# The reason given for private attributes (a site's policy may accept them).
PRIVATE = "private attributes present"
# A dummy value (PS3.15 action D) or a pseudonym written by a de-identifier starts so.
PSEUDONYM_PREFIX = "ANON"
# Modalities whose images commonly carry burned-in text (PS3.15 E.1.1, PS3.3 C.7.6.1.1.7).
BURNED_IN_MODALITIES = frozenset({"US", "SC", "XC", "ES", "GM", "SM", "OP", "DOC", "OT", "XA"})
_DEFERRED = object()  # a large value pydicom has not read: not empty
DATE_VRS = frozenset({"DA", "DT", "TM"})
_TEXT_VRS = frozenset({"PN", "LO", "SH", "LT", "ST", "UT", "UC", "AE", "CS", "AS"})
# Profile table columns in dicom-anonymizer's database, as medfed's action letters.
_COLUMNS = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}


@dataclass(frozen=True)
class Option:
    """A profile or option of PS3.15 Annex E, with its code (DCM) and what it retains.

    Attributes:
        name: medfed's name (`--profile basic,retain-long-modified-dates`).
        code: Its code value in DCM (CID 7050).
        meaning: Its code meaning.
        keeps: Keywords the option retains that the Basic Profile removes.
        dates: "full" or "modified" for the longitudinal temporal options.
    """

    name: str
    code: str
    meaning: str
    keeps: frozenset[str] = frozenset()
    dates: str | None = None


BASIC = Option("basic", "113100", "Basic Application Confidentiality Profile")
OPTIONS: dict[str, Option] = {
    o.name: o
    for o in (
        BASIC,
        Option(
            "retain-long-full-dates",
            "113106",
            "Retain Longitudinal Temporal Information Full Dates Option",
            dates="full",
        ),
        Option(
            "retain-long-modified-dates",
            "113107",
            "Retain Longitudinal Temporal Information Modified Dates Option",
            dates="modified",
        ),
        Option(
            "retain-patient-chars",
            "113108",
            "Retain Patient Characteristics Option",
            frozenset(
                {
                    "PatientSex",
                    "PatientAge",
                    "PatientSize",
                    "PatientWeight",
                    "EthnicGroup",
                    "SmokingStatus",
                    "PregnancyStatus",
                    "PatientSexNeutered",
                }
            ),
        ),
        Option(
            "retain-device-identity",
            "113109",
            "Retain Device Identity Option",
            frozenset(
                {
                    "StationName",
                    "DeviceSerialNumber",
                    "DetectorID",
                    "GantryID",
                    "PlateID",
                    "CassetteID",
                    "DeviceLabel",
                    "GeneratorID",
                }
            ),
        ),
        Option(
            "retain-institution-identity",
            "113112",
            "Retain Institution Identity Option",
            frozenset(
                {
                    "InstitutionName",
                    "InstitutionAddress",
                    "InstitutionalDepartmentName",
                    "InstitutionCodeSequence",
                }
            ),
        ),
        Option(
            "clean-descriptors",
            "113105",
            "Clean Descriptors Option",
            frozenset(
                {
                    "StudyDescription",
                    "SeriesDescription",
                    "ProtocolName",
                    "PerformedProcedureStepDescription",
                    "RequestedProcedureDescription",
                }
            ),
        ),
    )
}
_BY_CODE = {o.code: o for o in OPTIONS.values()}


@cache
def _table() -> tuple[dict[int, str], tuple[tuple[int, int, str], ...]]:
    """Exact tags and masked tag ranges (value, mask, action) of Table E.1-1."""
    from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as table

    exact: dict[int, str] = {}
    masked: list[tuple[int, int, str]] = []
    for column, letter in _COLUMNS.items():
        for entry in getattr(table, column):
            if len(entry) == 2:
                exact[entry[0] << 16 | entry[1]] = letter
            else:  # (group, element, group mask, element mask)
                group, elem, gmask, emask = entry
                mask = gmask << 16 | emask
                masked.append(((group << 16 | elem) & mask, mask, letter))
    return exact, tuple(masked)


def action(tag: int) -> str | None:
    """The Basic Profile's action for a tag ("X", "Z", "D", "U", "X/Z", ...) or None (keep)."""
    exact, masked = _table()
    found = exact.get(int(tag))
    if found is None:
        found = next((a for value, mask, a in masked if int(tag) & mask == value), None)
    return found


def declared_options(ds: Any) -> list[Option]:
    """The profile and options a file says it was de-identified with (its code sequence)."""
    codes = [
        str(item.get("CodeValue", ""))
        for item in ds.get("DeidentificationMethodCodeSequence") or []
    ]
    return [_BY_CODE[c] for c in codes if c in _BY_CODE]


def kept_tags(options: Sequence[Option]) -> frozenset[int]:
    """Tags that the options retain although the Basic Profile acts on them."""
    return frozenset(tag_for_keyword(k) or -1 for o in options for k in o.keeps)


def burned_in_problem(ds: Any) -> str | None:
    """Why the pixels may carry text (burned-in annotation), or None."""
    burned = str(ds.get("BurnedInAnnotation", "") or "").upper()
    modality = str(ds.get("Modality", "") or "").upper()
    if burned == "YES":
        return "BurnedInAnnotation is YES: the pixels carry text"
    if modality in BURNED_IN_MODALITIES and burned != "NO":
        return (
            f"BurnedInAnnotation is {burned or 'absent'} for modality {modality}, where "
            "pixels often carry text"
        )
    return None


def _name(tag: int) -> str:
    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _elements(ds: Any) -> Iterator[tuple[int, str, Any, list[Any]]]:
    """(tag, VR, value, sequence items) of a header, top level; `_DEFERRED` when not read."""
    raw_items = getattr(ds, "raw_elements", None)
    if raw_items is not None:  # medfed's fast header: it parsed the sequences' items too
        yield from raw_items()
        return
    for tag in ds.keys():
        if int(tag) >= 0x7FE00000:  # pixel data and after: not attributes the profile names
            continue
        raw = ds.get_item(tag, keep_deferred=True)
        vr = str(getattr(raw, "VR", "") or "")
        if vr == "SQ":
            yield int(tag), vr, None, list(ds[tag].value or [])
            continue
        value = raw.value
        if isinstance(raw, RawDataElement):
            if value is None and raw.length:
                value = _DEFERRED
        elif value is None:
            value = ""
        yield int(tag), vr, value, []


def _empty(value: Any) -> bool:
    if value is None or value is _DEFERRED:
        return value is None
    if isinstance(value, bytes):
        value = value.strip(b"\x00 ")
    return value in ("", b"", None) or (isinstance(value, list | tuple) and not value)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1", "replace").strip("\x00 ")
    return str(value).strip()


def _walk(
    ds: Any,
    *,
    kept: frozenset[int],
    dates_kept: bool,
    where: str,
    found: set[str],
) -> None:
    for tag, vr, value, items in _elements(ds):
        if tag >> 16 & 1:  # odd group: private
            if vr == "SQ" or not _empty(value):
                found.add(f"{PRIVATE} (group {tag >> 16:04X}{where})")
            continue
        what = action(tag)
        name = _name(tag) + where
        if vr == "SQ":
            if what in ("X", "D") and tag not in kept and items:
                found.add(f"{name}: the profile removes this sequence")
                continue
            for item in items:
                inner = f" in {_name(tag)}"
                _walk(
                    item,
                    kept=kept,
                    dates_kept=dates_kept,
                    where=inner,
                    found=found,
                )
            continue
        if what is None or tag in kept or _empty(value):
            continue
        if "U" in what and vr == "UI":
            if not _text(value).startswith("2.25."):
                found.add(f"{name}: UID not pseudonymised (expected a 2.25 UUID-derived UID)")
        elif vr in DATE_VRS:
            if not dates_kept:
                found.add(
                    f"{name}: dates and times are removed unless a longitudinal option is declared"
                )
        elif what == "X":
            found.add(f"{name}: the profile removes this attribute")
        elif vr in _TEXT_VRS and not _text(value).upper().startswith(PSEUDONYM_PREFIX):
            found.add(f"{name}: holds a value that is neither empty nor a dummy or pseudonym")


def profile_problems(ds: Any) -> list[str]:
    """Why a header is not de-identified to the Basic Profile (empty: it is).

    Args:
        ds: A pydicom dataset (header) or medfed's fast header.

    Returns:
        Sorted reasons, each naming an attribute or a rule, never a value.
    """
    found: set[str] = set()
    if str(ds.get("PatientIdentityRemoved", "") or "").upper() != "YES":
        found.add("PatientIdentityRemoved is not YES")
    options = declared_options(ds)
    if not options and not ds.get("DeidentificationMethod"):
        found.add("no DeidentificationMethod or DeidentificationMethodCodeSequence")
    elif options and BASIC not in options:
        found.add("DeidentificationMethodCodeSequence does not name the Basic Profile (113100)")
    if burned := burned_in_problem(ds):
        found.add(burned)
    if str(ds.get("RecognizableVisualFeatures", "") or "").upper() == "YES":
        found.add("RecognizableVisualFeatures is YES")
    _walk(
        ds,
        kept=kept_tags(options),
        dates_kept=any(o.dates for o in options),
        where="",
        found=found,
    )
    return sorted(found)
