"""Where a site's DICOM comes from: a folder, or the hospital PACS (DICOMweb or DIMSE).

PACS objects are retrieved into a staging folder inside the output folder (named by
content, so a re-run does not duplicate them) and prepared like a folder; the PACS is
only queried and read.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydicom.dataset import Dataset

from federation.dicom.prepare import PrepareOptions, PrepareReport, prepare_folder
from federation.files import write_atomically

__all__ = [
    "INCOMING_DIR",
    "Destination",
    "SourceQuery",
    "fetch_source",
    "open_destination",
    "prepare_source",
    "store_instance",
]

INCOMING_DIR = "incoming"


@dataclass(frozen=True)
class SourceQuery:
    """Which series to take from a PACS (None: any).

    Attributes:
        modality: e.g. "CT".
        study_date: "YYYYMMDD" or a DICOM range "YYYYMMDD-YYYYMMDD" (open ends allowed).
        series_description: Series description, DICOM wildcards allowed.
    """

    modality: str | None = None
    study_date: str | None = None
    series_description: str | None = None

    def filters(self) -> dict[str, str]:
        """The query as DICOM keyword -> matching value."""
        pairs = {
            "Modality": self.modality,
            "StudyDate": self.study_date,
            "SeriesDescription": self.series_description,
        }
        return {k: v for k, v in pairs.items() if v}


def store_instance(ds: Dataset, incoming: Path) -> Path:
    """Write one retrieved instance into the staging folder (idempotent by SOP UID)."""
    name = hashlib.sha256(str(ds.SOPInstanceUID).encode()).hexdigest()[:32]
    folder = incoming / hashlib.sha256(str(ds.SeriesInstanceUID).encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.dcm"
    if not path.exists():
        write_atomically(path, lambda tmp: ds.save_as(tmp, enforce_file_format=True))
    return path


def fetch_source(source: str, incoming: Path, *, query: SourceQuery | None = None) -> Path:
    """The folder to read `source` from: the folder itself, or `incoming` after a retrieve.

    Raises:
        ValueError: The source is neither an existing folder nor a PACS address.
        ConnectionError: The PACS cannot be reached.
    """
    query = query or SourceQuery()
    if source.startswith(("dicomweb://", "http://", "https://")):
        from federation.dicom.sources.dicomweb import fetch_dicomweb

        incoming.mkdir(parents=True, exist_ok=True)
        fetch_dicomweb(source, incoming, query=query)
        return incoming
    if source.startswith("dimse://"):
        from federation.dicom.sources.dimse import fetch_dimse

        incoming.mkdir(parents=True, exist_ok=True)
        fetch_dimse(source, incoming, query=query)
        return incoming
    folder = Path(source)
    if not folder.is_dir():
        raise ValueError(
            f"source {source!r} is neither a folder nor a PACS address; give a folder, "
            "dicomweb://host:port/path, http(s)://... or dimse://AET@host:port"
        )
    return folder


def prepare_source(
    source: str,
    output: Path,
    *,
    options: PrepareOptions | None = None,
    query: SourceQuery | None = None,
) -> PrepareReport:
    """Prepare a site from `source` (folder, DICOMweb URL or dimse://AET@host:port).

    Raises:
        ValueError: The source is neither an existing folder nor a PACS address.
        ConnectionError: The PACS cannot be reached.

    """
    folder = fetch_source(source, output / INCOMING_DIR, query=query)
    return prepare_folder(folder, output, options=options)


class Destination(Protocol):
    """A PACS that results are stored to, one object at a time, over one connection."""

    def __enter__(self) -> Destination:
        """Connect and check the PACS answers (nothing is stored yet)."""
        ...

    def __exit__(self, *exc: object) -> None:
        """Close the connection."""
        ...

    def store(self, ds: Dataset) -> None:
        """Store one object.

        Raises:
            ConnectionError: The PACS refused it or went away.
        """
        ...


def open_destination(url: str) -> Destination:
    """The PACS at `url`: `dicomweb://` / `http(s)://` (STOW-RS) or `dimse://` (C-STORE).

    Raises:
        ValueError: `url` is neither.
    """
    if url.startswith(("dicomweb://", "http://", "https://")):
        from federation.dicom.sources.dicomweb import DicomwebDestination

        return DicomwebDestination(url)
    if url.startswith("dimse://"):
        from federation.dicom.sources.dimse import DimseDestination

        return DimseDestination(url)
    raise ValueError(
        f"destination {url!r} is not a PACS address; give dicomweb://host:port/path, "
        "http(s)://... (STOW-RS) or dimse://AET@host:port (C-STORE)"
    )
