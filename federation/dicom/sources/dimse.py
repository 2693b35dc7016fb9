"""Retrieve series from a DIMSE PACS: C-FIND at series level, then C-GET."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from federation.dicom.sources import SourceQuery, store_instance

__all__ = ["DimseDestination", "fetch_dimse", "parse_dimse_url"]

_FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve Information Model - FIND
_GET = "1.2.840.10008.5.1.4.1.2.2.3"  # Study Root Query/Retrieve Information Model - GET
_STORAGE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4",  # MR
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.128",  # PET
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set
)


def parse_dimse_url(url: str) -> tuple[str, str, int]:
    """(called AE title, host, port) of `dimse://AET@host:port`.

    Raises:
        ValueError: The address is not of that form.

    """
    rest = url.removeprefix("dimse://")
    try:
        aet, hostport = rest.split("@", 1)
        host, port = hostport.rsplit(":", 1)
        return aet, host, int(port)
    except ValueError as err:
        raise ValueError(
            f"{url!r} is not dimse://AET@host:port (e.g. dimse://ORTHANC@pacs:4242)"
        ) from err


def fetch_dimse(
    url: str, incoming: Path, *, query: SourceQuery, calling_aet: str = "MEDFED"
) -> int:
    """Store every series matching `query` into `incoming` by C-FIND + C-GET.

    Raises:
        ConnectionError: The PACS cannot be reached or refuses an association.

    """
    from pynetdicom import AE, build_role, evt

    aet, host, port = parse_dimse_url(url)
    log = logging.getLogger("medfed.prepare")
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(_FIND)
    ae.add_requested_context(_GET)
    for uid in _STORAGE_CLASSES:
        ae.add_requested_context(uid)
    roles: list[Any] = [build_role(uid, scp_role=True) for uid in _STORAGE_CLASSES]
    stored = 0

    def on_store(event: Any) -> int:
        nonlocal stored
        ds = event.dataset
        ds.file_meta = event.file_meta
        store_instance(ds, incoming)
        stored += 1
        return 0x0000

    assoc = ae.associate(
        host, port, ae_title=aet, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    if not assoc.is_established:
        raise ConnectionError(f"no DICOM association with {aet}@{host}:{port} (is the PACS up?)")
    try:
        ident = Dataset()
        ident.QueryRetrieveLevel = "SERIES"
        ident.StudyInstanceUID = ""
        ident.SeriesInstanceUID = ""
        for key in ("Modality", "StudyDate", "SeriesDescription"):
            setattr(ident, key, query.filters().get(key, ""))
        series = _find(assoc, ident)
        # Labels of the selected studies come along, whatever the image query says.
        for study_uid in sorted({study for study, _, _ in series}):
            labels = Dataset()
            labels.QueryRetrieveLevel = "SERIES"
            labels.StudyInstanceUID = study_uid
            labels.SeriesInstanceUID = ""
            labels.Modality = ""
            series += [s for s in _find(assoc, labels) if s[2] in ("SEG", "RTSTRUCT")]
        series = sorted(set(series))
        for k, (study_uid, series_uid, _) in enumerate(series):
            get = Dataset()
            get.QueryRetrieveLevel = "SERIES"
            get.StudyInstanceUID = study_uid
            get.SeriesInstanceUID = series_uid
            for status, _ in assoc.send_c_get(get, _GET):
                if status and status.Status not in (0x0000, 0xFF00, 0xFF01):
                    log.warning("C-GET of series %d ended with status 0x%04x", k + 1, status.Status)
            log.info("retrieved series %d of %d over C-GET", k + 1, len(series))
    finally:
        assoc.release()
    return stored


def _find(assoc: Any, ident: Dataset) -> list[tuple[str, str, str]]:
    found_series = []
    for status, found in assoc.send_c_find(ident, _FIND):
        if status and status.Status in (0xFF00, 0xFF01) and found is not None:
            found_series.append(
                (
                    str(found.StudyInstanceUID),
                    str(found.SeriesInstanceUID),
                    str(found.get("Modality", "")),
                )
            )
    return found_series


_VERIFICATION = "1.2.840.10008.1.1"
_RESULT_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
)


class DimseDestination:
    """Store results by C-STORE over one association (`sources.Destination`)."""

    def __init__(self, url: str, *, calling_aet: str = "MEDFED") -> None:
        self.aet, self.host, self.port = parse_dimse_url(url)
        self.calling_aet = calling_aet
        self.assoc: Any = None

    def __enter__(self) -> DimseDestination:
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_aet)
        for uid in (_VERIFICATION, *_RESULT_CLASSES):
            ae.add_requested_context(uid)
        self.assoc = ae.associate(self.host, self.port, ae_title=self.aet)
        where = f"{self.aet}@{self.host}:{self.port}"
        if not self.assoc.is_established:
            raise ConnectionError(f"no DICOM association with {where} (is the PACS up?)")
        status = self.assoc.send_c_echo()
        if not status or status.Status != 0x0000:
            self.assoc.release()
            raise ConnectionError(f"{where} does not answer C-ECHO")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()

    def store(self, ds: Dataset) -> None:
        """C-STORE one object."""
        status = self.assoc.send_c_store(ds)
        if not status or status.Status != 0x0000:
            code = f"0x{status.Status:04x}" if status else "no answer"
            raise ConnectionError(
                f"C-STORE of {ds.SOPClassUID.name} to {self.aet}@{self.host}:{self.port} "
                f"failed ({code})"
            )
