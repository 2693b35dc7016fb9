"""`medfed site deidentify`: a de-identified copy of a site's DICOM, and its pseudonym map.

Reads the same sources as `site prepare` (a folder, DICOMweb, DIMSE) and writes one file
at a time, so memory stays flat. The pseudonym key and the re-identification map stay in
the site's state folder: the key readable by its owner only, the map encrypted with it
(Fernet), because a hospital must be able to re-identify for a clinical follow-up.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import pydicom
from cryptography.fernet import Fernet
from tqdm import tqdm

from federation.dicom.classlabels import LABELS_CSV
from federation.dicom.deidentify import Deidentifier, NotDeidentifiable, Pseudonyms
from federation.dicom.labels import is_nifti
from federation.dicom.profile import Option
from federation.dicom.scan import Problem, iter_files
from federation.dicom.sources import SourceQuery, fetch_source
from federation.files import write_atomically
from federation.security import load_or_create_secret

__all__ = ["DEID_DIR", "DeidReport", "PseudonymMap", "deidentify_folder", "deidentify_source"]

DEID_DIR = "deid"
KEY_FILE = "pseudonym.key"
MAP_FILE = "pseudonyms.enc"
REPORT_FILE = "report.json"  # the last run's, in the state: it names source paths


class PseudonymMap:
    """The site's pseudonym key and its encrypted re-identification map.

    One Fernet token per line, each an encrypted {kind, pseudonym, original}; appended
    only, and only for pseudonyms not yet in it.
    """

    def __init__(self, state_dir: Path) -> None:
        """Open (creating on first use) the key and map in the site's state folder.

        Raises:
            PermissionError: The key file is readable by others than its owner.
        """
        folder = state_dir / DEID_DIR
        folder.mkdir(parents=True, exist_ok=True)
        raw = load_or_create_secret(
            folder / KEY_FILE, Fernet.generate_key, what="pseudonym key"
        ).strip()
        self._fernet = Fernet(raw)
        secret = base64.urlsafe_b64decode(raw)
        self.pseudonyms = Pseudonyms(hashlib.sha256(b"medfed-pseudonyms\x00" + secret).digest())
        self.path = folder / MAP_FILE
        self._known = {entry["pseudonym"] for entry in self.entries()}

    def entries(self) -> list[dict[str, str]]:
        """Every entry of the map, decrypted."""
        if not self.path.exists():
            return []
        lines = self.path.read_bytes().splitlines()
        return [json.loads(self._fernet.decrypt(line)) for line in lines if line.strip()]

    def record(self, kind: str, pseudonym: str, original: str) -> None:
        """Add an entry unless the pseudonym is already mapped."""
        if pseudonym in self._known:
            return
        token = self._fernet.encrypt(
            json.dumps({"kind": kind, "pseudonym": pseudonym, "original": original}).encode()
        )
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "ab") as fh:
            fh.write(token + b"\n")
        self._known.add(pseudonym)

    def lookup(self, pseudonym: str) -> list[dict[str, str]]:
        """The originals behind a pseudonym (empty when the site never made it)."""
        return [e for e in self.entries() if e["pseudonym"] == pseudonym.strip()]


@dataclass
class DeidReport:
    """What a de-identification wrote and left out (source paths, never values)."""

    options: list[str]
    written: int = 0
    problems: list[Problem] = field(default_factory=list)

    def summary(self) -> str:
        """One line per outcome."""
        lines = [f"{self.written} files de-identified ({', '.join(self.options)})"]
        lines += [f"  not written: {p.path}: {p.reason}" for p in self.problems[:20]]
        if len(self.problems) > 20:
            lines.append(f"  ... and {len(self.problems) - 20} more (see {REPORT_FILE})")
        return "\n".join(lines)


def _read(path: Path) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


def _remap_csv(path: Path, target: Path, pseudonyms: Pseudonyms) -> None:
    """The class labels CSV with its Study/Series UIDs replaced by their pseudonyms."""
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    fields = list(rows[0]) if rows else ["StudyInstanceUID", "SeriesInstanceUID", "label"]
    for row in rows:
        for column in ("StudyInstanceUID", "SeriesInstanceUID"):
            if row.get(column):
                row[column] = pseudonyms.uid(row[column])
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(target, out.getvalue())


def deidentify_folder(
    folder: Path,
    output: Path,
    deidentifier: Deidentifier,
    *,
    report: DeidReport,
    progress: Callable[[int], object] | None = None,
) -> None:
    """De-identify every file under `folder` into `output/<patient>/<series>/<sop>.dcm`.

    The labels CSV has its UIDs remapped. NIfTI masks are not copied (listed as problems):
    their file and folder names may identify, so a person places them.
    """
    pseudonyms = deidentifier.pseudonyms
    for path in iter_files(folder):
        if progress is not None:
            progress(1)
        if path.name == LABELS_CSV:
            _remap_csv(path, output / LABELS_CSV, pseudonyms)
            continue
        if is_nifti(path):
            report.problems.append(
                Problem(str(path), "NIfTI mask: copy it beside the de-identified series by hand")
            )
            continue
        try:
            ds = _read(path)
            patient = str(ds.get("PatientID", "") or "")
            series = str(ds.get("SeriesInstanceUID", "") or "")
            deidentifier(ds)
        except NotDeidentifiable as err:
            report.problems.append(Problem(str(path), str(err)))
            continue
        except Exception as err:  # a bad file is listed, never stops the copy
            report.problems.append(Problem(str(path), f"not readable DICOM: {type(err).__name__}"))
            continue
        target = (
            output
            / pseudonyms.text("patient", patient)
            / pseudonyms.uid(series).removeprefix("2.25.")[:16]
            / f"{ds.SOPInstanceUID}.dcm"
        )
        write_atomically(target, partial(ds.save_as, enforce_file_format=True))
        report.written += 1


def deidentify_source(
    source: str,
    output: Path,
    *,
    state_dir: Path,
    options: Sequence[Option],
    query: SourceQuery | None = None,
    progress: bool = False,
) -> DeidReport:
    """Write a de-identified copy of `source` into `output`, mapping pseudonyms in the state.

    A PACS source is retrieved into the site's state folder first and removed after. The
    report (source paths of files not written, and why) goes to the state folder too.

    Raises:
        ValueError: The source is neither a folder nor a PACS address, or `output` is
            inside the source.
        ConnectionError: The PACS cannot be reached.
    """
    staging = state_dir / DEID_DIR / "incoming"
    try:  # an identified copy staged from a PACS never outlives the run, even a failed one
        folder = fetch_source(source, staging, query=query)
        if output.resolve().is_relative_to(folder.resolve()):
            raise ValueError(
                f"output {output} is inside the source {folder}; choose another folder"
            )
        pseudonym_map = PseudonymMap(state_dir)
        deidentifier = Deidentifier(pseudonym_map.pseudonyms, options, record=pseudonym_map.record)
        report = DeidReport(options=[o.name for o in options])
        total = sum(1 for _ in iter_files(folder)) if progress else 0
        with tqdm(total=total, unit="file", desc="de-identify", disable=not progress) as bar:
            deidentify_folder(folder, output, deidentifier, report=report, progress=bar.update)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_atomically(
        state_dir / DEID_DIR / REPORT_FILE,
        json.dumps(
            {
                "options": report.options,
                "written": report.written,
                "problems": [asdict(p) for p in report.problems],
            },
            indent=1,
        ),
    )
    return report
