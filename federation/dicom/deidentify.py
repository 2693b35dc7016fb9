"""De-identify one DICOM dataset to PS3.15's Basic Profile and the options asked for.

Pseudonyms are keyed hashes (HMAC-SHA256 with the site's secret), so the same patient,
study, series or instance gets the same pseudonym in every file and every run, with no
table in memory: SEG and RTSTRUCT references still resolve after de-identification. With
the Modified Dates option every date of a patient moves by the same number of days, which
keeps intervals. Each pseudonym is reported to `record`, for the site's re-identification
map.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from federation.dicom.profile import (
    BASIC,
    DATE_VRS,
    OPTIONS,
    PSEUDONYM_PREFIX,
    Option,
    action,
    burned_in_problem,
    kept_tags,
)

__all__ = ["Deidentifier", "NotDeidentifiable", "Pseudonyms", "parse_profile"]

_TEXT_VRS = frozenset({"PN", "LO", "SH", "LT", "ST", "UT", "UC"})
# Identity attributes that get a pseudonym (kind for the map) rather than a blank.
_IDENTITY = {
    int(Tag("PatientID")): "patient",
    int(Tag("PatientName")): "patient",
    int(Tag("AccessionNumber")): "accession",
    int(Tag("StudyID")): "study-id",
}
_MAPPED_UIDS = {int(Tag("StudyInstanceUID")): "study", int(Tag("SeriesInstanceUID")): "series"}
METHOD = "PS3.15 E.1-1 (2026c) by medfed"


def parse_profile(text: str) -> tuple[Option, ...]:
    """Options from "basic,retain-long-modified-dates,..." (the Basic Profile always first).

    Raises:
        ValueError: An unknown option, or two date options.
    """
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        raise ValueError(
            f"unknown de-identification option(s) {', '.join(unknown)}; choose from "
            f"{', '.join(OPTIONS)}"
        )
    chosen = [BASIC, *(OPTIONS[n] for n in dict.fromkeys(names) if n != BASIC.name)]
    if sum(o.dates is not None for o in chosen) > 1:
        raise ValueError("choose one of retain-long-full-dates and retain-long-modified-dates")
    return tuple(chosen)


class NotDeidentifiable(ValueError):
    """A file that cannot be de-identified here (its pixels carry text)."""


@dataclass(frozen=True)
class Pseudonyms:
    """Keyed, consistent pseudonyms: text identifiers, UIDs and per-patient date shifts."""

    key: bytes

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self.key, f"{kind}\x00{value}".encode(), hashlib.sha256).digest()

    def text(self, kind: str, value: str) -> str:
        """A 16-character pseudonym (fits SH) starting with the dummy prefix."""
        return PSEUDONYM_PREFIX + self._digest(kind, value).hex()[:12].upper()

    def uid(self, value: str) -> str:
        """A 2.25 UID (PS3.5 B.2) derived from `value`."""
        return f"2.25.{int.from_bytes(self._digest('uid', value)[:16], 'big')}"

    def days(self, patient: str) -> int:
        """The patient's date shift: 30 to 3,679 days back."""
        return -(30 + int.from_bytes(self._digest("days", patient)[:4], "big") % 3650)


@dataclass
class Deidentifier:
    """Apply the profile to datasets in place.

    Attributes:
        pseudonyms: The site's keyed pseudonyms.
        options: The Basic Profile and the options chosen (`parse_profile`).
        record: Called with (kind, pseudonym, original) for each pseudonym made.
    """

    pseudonyms: Pseudonyms
    options: Sequence[Option] = (BASIC,)
    record: Callable[[str, str, str], None] | None = None
    _kept: frozenset[int] = field(init=False)
    _dates: str | None = field(init=False)

    def __post_init__(self) -> None:
        self._kept = kept_tags(self.options)
        self._dates = next((o.dates for o in self.options if o.dates), None)

    def __call__(self, ds: Dataset) -> Dataset:
        """De-identify `ds` in place (and return it).

        Raises:
            NotDeidentifiable: Its pixels carry burned-in text (Clean Pixel Data is not
                offered), or it is expected to and does not say otherwise.
        """
        if burned := burned_in_problem(ds):
            raise NotDeidentifiable(
                f"{burned}; clean the pixels first, then set BurnedInAnnotation NO"
            )
        patient = str(ds.get("PatientID", "") or ds.get("PatientName", "") or "")
        self._apply(ds, patient, self.pseudonyms.days(patient))
        meta = getattr(ds, "file_meta", None)
        if meta is not None and "MediaStorageSOPInstanceUID" in meta:
            meta.MediaStorageSOPInstanceUID = self.pseudonyms.uid(
                str(meta.MediaStorageSOPInstanceUID)
            )
        self._declare(ds)
        return ds

    def _note(self, kind: str, pseudonym: str, original: str) -> None:
        if self.record is not None and original:
            self.record(kind, pseudonym, original)

    def _apply(self, ds: Dataset, patient: str, days: int) -> None:
        for key in list(ds.keys()):  # values are converted only where the profile acts
            tag = int(key)
            if tag >> 16 & 1:  # private
                del ds[key]
                continue
            what = action(tag)
            if tag in self._kept:
                continue
            vr = ds.get_item(key).VR or ds[key].VR
            if vr == "SQ":  # nested attributes are judged too
                if what in ("X", "D"):
                    del ds[key]
                else:
                    for item in ds[key].value or []:
                        self._apply(item, patient, days)
            elif what is not None:
                self._element(ds, ds[key], what, patient, days)

    def _element(self, ds: Dataset, elem: DataElement, what: str, patient: str, days: int) -> None:
        tag = int(elem.tag)
        value = "" if elem.value is None else str(elem.value)
        if tag in _IDENTITY:
            kind = _IDENTITY[tag]
            pseudonym = self.pseudonyms.text(kind, patient if kind == "patient" else value)
            elem.value = pseudonym if value or kind == "patient" else ""
            self._note(kind, pseudonym, patient if kind == "patient" else value)
        elif "U" in what and elem.VR == "UI":
            uids = list(elem.value) if elem.VM > 1 else [value]
            new = [self.pseudonyms.uid(u) for u in uids if u]
            for old, uid in zip(uids, new, strict=False):
                if tag in _MAPPED_UIDS:
                    self._note(_MAPPED_UIDS[tag], uid, old)
            elem.value = new if elem.VM > 1 else (new[0] if new else "")
        elif elem.VR in DATE_VRS:
            if self._dates == "modified":
                elem.value = _shift(elem.VR, elem.value, days)
            elif self._dates is None:
                _blank(ds, elem, what)
        elif what == "X":
            del ds[elem.tag]
        elif what in ("D", "X/D") and elem.VR in _TEXT_VRS and value:
            elem.value = PSEUDONYM_PREFIX + "YMIZED"
        else:
            _blank(ds, elem, what)

    def _declare(self, ds: Dataset) -> None:
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = METHOD
        items = []
        for option in self.options:
            item = Dataset()
            item.CodeValue = option.code
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = option.meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = items
        temporal = {"modified": "MODIFIED", "full": "UNMODIFIED", None: "REMOVED"}
        ds.LongitudinalTemporalInformationModified = temporal[self._dates]


def _blank(ds: Dataset, elem: DataElement, what: str) -> None:
    """X removes; the combined actions keep the attribute, empty (Type 2 safe)."""
    if what == "X":
        del ds[elem.tag]
    else:
        elem.value = (
            None if elem.VR not in _TEXT_VRS | DATE_VRS | {"CS", "AS", "UI", "IS", "DS"} else ""
        )


def _shift(vr: str, value: object, days: int) -> object:
    """A DA or DT value moved by `days` (TM and unparseable values unchanged)."""
    text = str(value or "")
    if vr == "TM" or len(text) < 8 or not text[:8].isdigit():
        return value
    try:
        day = dt.datetime.strptime(text[:8], "%Y%m%d").date() + dt.timedelta(days=days)
    except ValueError:
        return ""
    return day.strftime("%Y%m%d") + text[8:]
