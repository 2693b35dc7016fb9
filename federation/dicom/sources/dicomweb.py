"""Retrieve series from a DICOMweb PACS (QIDO-RS search, WADO-RS retrieve)."""

from __future__ import annotations

import logging
from pathlib import Path

from pydicom.dataset import Dataset

from federation.dicom.sources import SourceQuery, store_instance

__all__ = ["DicomwebDestination", "fetch_dicomweb"]

_SERIES_UID = "0020000E"
_STUDY_UID = "0020000D"


def _base(url: str) -> str:
    base = "http://" + url.removeprefix("dicomweb://") if url.startswith("dicomweb://") else url
    return base.rstrip("/")


def fetch_dicomweb(url: str, incoming: Path, *, query: SourceQuery) -> int:
    """Store every series matching `query` into `incoming`; return the instances stored.

    Raises:
        ConnectionError: The DICOMweb service cannot be reached or refuses the query.

    """
    import requests
    from dicomweb_client.api import DICOMwebClient

    base = _base(url)
    client = DICOMwebClient(url=base)
    log = logging.getLogger("medfed.prepare")
    try:
        found = client.search_for_series(search_filters=query.filters(), get_remaining=True)
    except requests.RequestException as err:
        raise ConnectionError(f"DICOMweb search at {base} failed: {err}") from err
    selected = {(s[_STUDY_UID]["Value"][0], s[_SERIES_UID]["Value"][0]) for s in found}
    # Labels of the selected studies come along, whatever the image query says.
    for study_uid in sorted({study for study, _ in selected}):
        for modality in ("SEG", "RTSTRUCT"):
            for s in client.search_for_series(
                study_instance_uid=study_uid, search_filters={"Modality": modality}
            ):
                selected.add((study_uid, s[_SERIES_UID]["Value"][0]))
    stored = 0
    for k, (study_uid, series_uid) in enumerate(sorted(selected)):
        try:
            instances = client.retrieve_series(study_uid, series_uid)
        except requests.RequestException as err:
            raise ConnectionError(f"DICOMweb retrieve at {base} failed: {err}") from err
        for ds in instances:
            store_instance(ds, incoming)
            stored += 1
        log.info("retrieved series %d of %d over DICOMweb", k + 1, len(selected))
    return stored


class DicomwebDestination:
    """Store results over STOW-RS (`federation.dicom.sources.Destination`)."""

    def __init__(self, url: str) -> None:
        from dicomweb_client.api import DICOMwebClient

        self.base = _base(url)
        self.client = DICOMwebClient(url=self.base)

    def __enter__(self) -> DicomwebDestination:
        import requests

        try:
            self.client.search_for_studies(limit=1)
        except requests.RequestException as err:
            raise ConnectionError(
                f"DICOMweb service at {self.base} does not answer: {err}"
            ) from err
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def store(self, ds: Dataset) -> None:
        """STOW-RS one object."""
        import requests

        try:
            self.client.store_instances([ds])
        except requests.RequestException as err:
            raise ConnectionError(f"DICOMweb store at {self.base} failed: {err}") from err
