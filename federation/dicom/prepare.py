"""Prepare a site's DICOM: scan, group, check, build, label, cache; manifest and quarantine.

One series at a time is held in memory (stream, never the whole site). Source files are
only ever read. Every file ends up used, skipped as cached, or quarantined with a reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from federation.appdigest import source_digest
from federation.dicom.cache import VolumeCache, file_hash
from federation.dicom.classlabels import LABELS_CSV, read_class_labels
from federation.dicom.labels import (
    is_nifti,
    nifti_label,
    rtstruct_label,
    seg_label,
)
from federation.dicom.phi import deidentification_gate
from federation.dicom.scan import Instance, Problem, iter_files, scan_paths
from federation.dicom.volume import GeometryError, Volume, group_series, plan_series, read_volume
from federation.files import write_atomically

__all__ = [
    "HISTOGRAM_STRIDE",
    "HU_BINS",
    "PrepareOptions",
    "PrepareReport",
    "SeriesEntry",
    "labelled_volumes",
    "prepare_folder",
]

HU_BINS = np.linspace(-1000.0, 2000.0, 31)
HISTOGRAM_STRIDE = 4
# The folder's last preparation: its outcome, reused while nothing it read changed.
_LAST_REPORT = "last-preparation.json"


@dataclass(frozen=True)
class PrepareOptions:
    """How to prepare a site.

    Attributes:
        labels_csv: CSV of study/series-level class labels.
        target_spacing: Resample every volume to this (slice, row, col) spacing in mm.
        require_deidentified: Judge files against PS3.15's Basic Profile (site policy).
        on_phi: What a file that fails means: "quarantine" leaves out its series and goes
            on, "refuse" refuses the preparation.
        private_tags: "remove" (private attributes fail the gate) or "keep".
        progress: Show progress bars (for interactive use).
    """

    labels_csv: Path | None = None
    target_spacing: tuple[float, float, float] | None = None
    require_deidentified: bool = False
    on_phi: str = "quarantine"
    private_tags: str = "remove"
    progress: bool = False

    def gate(self, instances: list[Instance], problems: list[Problem]) -> list[Instance]:
        """The instances the de-identification gate lets through (all when it is off).

        Those it leaves out are added to `problems`.

        Raises:
            DeidentificationRequired: `on_phi` is "refuse" and a file fails.
        """
        if not self.require_deidentified:
            return instances
        kept, left_out = deidentification_gate(
            instances, on_phi=self.on_phi, private_tags=self.private_tags
        )
        problems.extend(left_out)
        return kept

    def fingerprint(self) -> str:
        """The options that change prepared tensors (part of every cache key)."""
        return json.dumps({"spacing": self.target_spacing})


@dataclass
class SeriesEntry:
    """One prepared series in the manifest: no names, IDs or UIDs, only pseudonyms."""

    key: str
    series: str  # pseudonym of the series UID
    patient: str  # pseudonym of the patient ID
    modality: str
    manufacturer: str
    shape: list[int]
    spacing: list[float]
    files: int
    label: str  # "seg", "rtstruct", "nifti" or "none"
    foreground_fraction: float
    class_label: str | None
    hu_histogram: list[int]
    cached: bool = False


@dataclass
class PrepareReport:
    """What a preparation did."""

    entries: list[SeriesEntry] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    files_seen: int = 0

    @property
    def prepared(self) -> int:
        """Series built in this run."""
        return sum(not e.cached for e in self.entries)

    @property
    def skipped(self) -> int:
        """Series unchanged since an earlier run (read from the cache)."""
        return sum(e.cached for e in self.entries)

    def reasons(self) -> Counter[str]:
        """Quarantined files per reason (details such as sizes stripped)."""
        return Counter(p.reason.split(":")[0] for p in self.problems)

    def summary(self) -> str:
        """One paragraph: prepared, skipped, quarantined and why."""
        lines = [
            f"{len(self.entries)} series ready ({self.prepared} prepared, {self.skipped} "
            f"unchanged from the cache) from {self.files_seen} files; "
            f"{len(self.problems)} files quarantined"
        ]
        lines += [f"  {n:5d} x {reason}" for reason, n in self.reasons().most_common()]
        return "\n".join(lines)

    def write(self, output: Path) -> None:
        """Write `manifest.json` and `quarantine.json` into `output`."""
        output.mkdir(parents=True, exist_ok=True)
        (output / "manifest.json").write_text(
            json.dumps([asdict(e) for e in self.entries], indent=1)
        )
        (output / "quarantine.json").write_text(
            json.dumps([asdict(p) for p in self.problems], indent=1)
        )


def _pseudonym(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:16]


def _bar(total: int, desc: str, enabled: bool) -> Any:
    return tqdm(total=total, desc=desc, unit="file", disable=not enabled, leave=False)


@dataclass
class _Labels:
    by_series: dict[str, list[Instance]]
    nifti: dict[str, Path]  # series UID -> mask
    classes: dict[str, str]


def _find_labels(
    instances: list[Instance],
    niftis: list[Path],
    series: dict[str, list[Instance]],
    csv_path: Path | None,
    problems: list[Problem],
) -> _Labels:
    by_series: dict[str, list[Instance]] = defaultdict(list)
    for inst in instances:
        if inst.kind == "image":
            continue
        matched = [r for r in inst.references if r in series]
        if not matched:
            problems.append(Problem(inst.path, f"{inst.kind.upper()} without its source series"))
        for uid in matched:
            by_series[uid].append(inst)
    folders: dict[str, set[str]] = defaultdict(set)
    for uid, insts in series.items():
        for inst in insts:
            folders[str(Path(inst.path).parent)].add(uid)
    nifti: dict[str, Path] = {}
    for path in niftis:
        stem = path.name.removesuffix(".gz").removesuffix(".nii")
        in_folder = folders.get(str(path.parent), set())
        if stem in series:
            nifti[stem] = path
        elif len(in_folder) == 1:
            nifti[next(iter(in_folder))] = path
        else:
            problems.append(
                Problem(
                    str(path),
                    "NIfTI mask matches no series: name it <SeriesInstanceUID>.nii.gz or put "
                    "it in the folder of exactly one series",
                )
            )
    classes = read_class_labels(csv_path) if csv_path else {}
    return _Labels(dict(by_series), nifti, classes)


def _label_hashes(uid: str, labels: _Labels) -> list[str]:
    hashes = [f"{i.kind}:{file_hash(i)}" for i in labels.by_series.get(uid, [])]
    if uid in labels.nifti:
        hashes.append("nifti:" + hashlib.sha256(labels.nifti[uid].read_bytes()).hexdigest())
    return hashes


def _class_label(volume: Volume, uid: str, labels: _Labels) -> str | None:
    """The series' (or its study's) class from this run's CSV: never cached, so edits count."""
    return labels.classes.get(uid) or labels.classes.get(volume.study_uid)


def _attach_label(volume: Volume, uid: str, labels: _Labels, problems: list[Problem]) -> str:
    for inst in labels.by_series.get(uid, []):
        try:
            reader = seg_label if inst.kind == "seg" else rtstruct_label
            volume.label = reader(inst.path, volume)
            return inst.kind
        except Exception as err:  # a bad label never stops the site
            problems.append(Problem(inst.path, f"{inst.kind.upper()} unusable: {err}"))
    if uid in labels.nifti:
        try:
            volume.label = nifti_label(labels.nifti[uid], volume)
            return "nifti"
        except Exception as err:
            problems.append(Problem(str(labels.nifti[uid]), f"NIfTI mask unusable: {err}"))
    return "none"


def _hu_histogram(hu: np.ndarray) -> np.ndarray:
    """Voxel counts in the uniform HU_BINS (clipped to the end bins).

    A summary statistic: it samples every HISTOGRAM_STRIDE-th row and column of each slice.
    """
    lo, hi, bins = int(HU_BINS[0]), int(HU_BINS[-1]), len(HU_BINS) - 1
    width = (hi - lo) // bins
    counts = np.zeros(bins, dtype=np.int64)
    for start in range(0, hu.shape[0], 32):  # a few slices at a time: bounded memory
        sample = hu[start : start + 32, ::HISTOGRAM_STRIDE, ::HISTOGRAM_STRIDE]
        if np.issubdtype(sample.dtype, np.integer):
            idx = (np.clip(sample, lo, hi - 1).astype(np.int32) - lo) // width
        else:
            idx = ((np.clip(sample, lo, hi) - lo) / width).astype(np.intp)
            np.minimum(idx, bins - 1, out=idx)
        counts += np.bincount(idx.ravel(), minlength=bins)
    return counts


def _entry(key: str, volume: Volume, files: int, label: str, *, cached: bool) -> SeriesEntry:
    hist = _hu_histogram(volume.hu)
    fg = float(np.mean(volume.label)) if volume.label is not None else 0.0
    return SeriesEntry(
        key=key,
        series=_pseudonym(volume.series_uid),
        patient=volume.patient_key,
        modality=volume.modality,
        manufacturer=volume.manufacturer,
        shape=[int(n) for n in volume.hu.shape],
        spacing=[round(float(s), 4) for s in volume.spacing],
        files=files,
        label=label,
        foreground_fraction=round(fg, 6),
        class_label=volume.class_label,
        hu_histogram=[int(n) for n in hist],
        cached=cached,
    )


def prepare_folder(
    root: Path, cache_dir: Path, *, options: PrepareOptions | None = None
) -> PrepareReport:
    """Prepare every series under `root` into `cache_dir`.

    Raises:
        DeidentificationRequired: The policy refuses data that is not de-identified, and
            files are not.
        ValueError: `root` is not a folder, or the labels CSV is malformed.

    """
    opts = options or PrepareOptions()
    log = logging.getLogger("medfed.prepare")
    if not root.is_dir():
        raise ValueError(f"source {root} is not a folder; give the folder holding the DICOM files")
    cache = VolumeCache(cache_dir)
    paths = list(iter_files(root))
    site_labels = root / LABELS_CSV  # the site's class labels, beside its DICOM
    if site_labels.is_file():
        paths.remove(site_labels)
        if opts.labels_csv is None:
            opts = dataclasses.replace(opts, labels_csv=site_labels)
    unchanged = _folder_key(paths, opts)
    if unchanged is not None and (last := _last_report(cache, unchanged)) is not None:
        log.info("%d files unchanged since the last preparation: %s", len(paths), last.summary())
        return last
    niftis = [p for p in paths if is_nifti(p)]
    dicoms = [p for p in paths if not is_nifti(p)]
    report = PrepareReport(files_seen=len(paths))
    with _bar(len(dicoms), "scan headers", opts.progress) as bar:
        scan = scan_paths(dicoms, known=cache.load_index(), progress=bar.update)
    report.problems.extend(scan.problems)
    instances = opts.gate(scan.instances, report.problems)
    series = group_series(instances)
    labels = _find_labels(instances, niftis, series, opts.labels_csv, report.problems)
    log.info(
        "scanned %d files: %d series, %d files quarantined",
        len(paths),
        len(series),
        len(report.problems),
    )
    with _bar(sum(len(v) for v in series.values()), "prepare series", opts.progress) as bar:
        for uid in sorted(series):
            insts = series[uid]
            _prepare_series(uid, insts, labels, cache, opts, report)
            bar.update(len(insts))
    cache.save_index(scan.instances)
    removed = cache.prune(keep={e.key for e in report.entries})
    if removed:
        log.info("removed %d prepared volumes no longer in the source from the cache", removed)
    if unchanged is not None:
        record = {"key": unchanged, "report": asdict(report)}
        write_atomically(cache.root / _LAST_REPORT, json.dumps(record))
    return report


def _folder_key(paths: list[Path], opts: PrepareOptions) -> str | None:
    """Key of what a preparation's outcome depends on (None if a file vanished meanwhile).

    Every file's path, size and modification time, the options and the pipeline's code.
    """
    options = {k: v for k, v in asdict(opts).items() if k != "progress"}
    digest = hashlib.sha256(source_digest("federation/dicom").encode())
    digest.update(json.dumps(options, sort_keys=True, default=str).encode())
    try:
        for path in [*paths, *([opts.labels_csv] if opts.labels_csv else [])]:
            stat = path.stat()
            digest.update(f"\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    except OSError:
        return None
    return digest.hexdigest()


def _last_report(cache: VolumeCache, key: str) -> PrepareReport | None:
    """The last preparation's report if it had `key` and its volumes are still cached."""
    try:
        record = json.loads((cache.root / _LAST_REPORT).read_text())
        if record["key"] != key:
            return None
        raw = record["report"]
        report = PrepareReport(
            entries=[SeriesEntry(**{**e, "cached": True}) for e in raw["entries"]],
            problems=[Problem(**p) for p in raw["problems"]],
            files_seen=raw["files_seen"],
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return report if all(cache.has(e.key) for e in report.entries) else None


def _quarantine_series(
    uid: str, insts: list[Instance], labels: _Labels, report: PrepareReport, reason: str
) -> None:
    """Leave a series out with its reason, and with it every label of it.

    SEG, RTSTRUCT and NIfTI labels alike: they would otherwise be reported as unmatched.
    """
    report.problems.extend(Problem(i.path, reason) for i in insts)
    orphaned = [i.path for i in labels.by_series.get(uid, [])]
    orphaned += [str(labels.nifti[uid])] if uid in labels.nifti else []
    report.problems.extend(
        Problem(p, f"label of a quarantined series ({reason})") for p in orphaned
    )


def _prepare_series(
    uid: str,
    insts: list[Instance],
    labels: _Labels,
    cache: VolumeCache,
    opts: PrepareOptions,
    report: PrepareReport,
) -> None:
    try:
        plan = plan_series(insts)
    except GeometryError as err:
        _quarantine_series(uid, insts, labels, report, f"inconsistent series geometry: {err}")
        return
    label_hashes = _label_hashes(uid, labels)
    if all(i.content_hash for i in insts):
        key = cache.key([i.content_hash for i in insts], label_hashes, opts.fingerprint())
        if cache.has(key):
            volume = cache.get(key)
            volume.class_label = _class_label(volume, uid, labels)
            kind = _cached_label_kind(labels, uid, volume)
            report.entries.append(_entry(key, volume, len(insts), kind, cached=True))
            return
    try:
        volume = read_volume(plan)
    except ValueError as err:
        _quarantine_series(uid, insts, labels, report, f"undecodable pixel data: {err}")
        return
    key = cache.key([i.content_hash for i in insts], label_hashes, opts.fingerprint())
    kind = _attach_label(volume, uid, labels, report.problems)
    volume.class_label = _class_label(volume, uid, labels)
    if opts.target_spacing is not None:
        from federation.dicom.volume import resample

        volume = resample(volume, spacing=opts.target_spacing)
    cache.put(key, volume)
    report.entries.append(_entry(key, volume, len(insts), kind, cached=False))


def _cached_label_kind(labels: _Labels, uid: str, volume: Volume) -> str:
    if volume.label is None:
        return "none"
    if uid in labels.by_series:
        return labels.by_series[uid][0].kind
    return "nifti"


def _load(cache: VolumeCache, entry: SeriesEntry, *, mmap: bool) -> Volume:
    volume = cache.get(entry.key, mmap=mmap)
    volume.class_label = entry.class_label
    return volume


def labelled_volumes(
    root: Path,
    cache_dir: Path,
    *,
    options: PrepareOptions | None = None,
    require_mask: bool = True,
    mmap: bool = False,
) -> tuple[list[Volume], PrepareReport]:
    """Prepare `root` and load its labelled volumes.

    With `require_mask` (segmentation) a volume needs a mask label; without it
    (classification) a class label from the site's CSV is enough. Series without the
    label needed are listed in the report's problems. With `mmap` the volumes are
    memory-mapped (copy-on-write): read only where they are used.
    """
    report = prepare_folder(root, cache_dir, options=options)
    cache = VolumeCache(cache_dir)
    volumes = []
    for entry in report.entries:
        if not require_mask:
            volume = _load(cache, entry, mmap=mmap)
            if volume.class_label is not None:
                volumes.append(volume)
            else:
                report.problems.append(
                    Problem(f"series {entry.series}", "series has no class label in the CSV")
                )
            continue
        if entry.label == "none":
            report.problems.append(
                Problem(
                    f"series {entry.series}", "series has no mask label (SEG, RTSTRUCT or NIfTI)"
                )
            )
            continue
        volumes.append(_load(cache, entry, mmap=mmap))
    return volumes, report
