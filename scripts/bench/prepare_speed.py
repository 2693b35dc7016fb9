#!/usr/bin/env python3
"""Speed and memory of site preparation against the naive ways of reading the same DICOM.

Writes a synthetic CT archive (one folder per series, 512x512 int16 slices with rescale,
shuffled file order), then runs each measurement in its own process (own peak memory,
no shared imports or caches), all on the same files with the OS page cache warm:

- bytes:  read every file's bytes (the floor)
- naive:  per file `pydicom.dcmread` + `pixel_array` + rescale
- monai:  per file MONAI `LoadImage`
- cold:   `prepare_folder` into an empty cache (scan, sort, checks, HU, hash, write)
- warm:   one epoch reading every prepared volume back from the cache
- memory: peak RSS of a cold prepare of N and of 4N series (it must not grow with N)

Where the OS lets it drop the page cache (root on Linux), bytes and cold are also
measured from the disk ("bytes-disk", "cold-disk"): the first prepare of a real archive
reads it from the disk, so that is the floor that matters there.

Prints a table and, on its last line, one JSON object with the headline figures.

    python scripts/bench/prepare_speed.py            # 8 series x 64 slices of 512x512
    python scripts/bench/prepare_speed.py --quick    # 4 series x 24 slices of 256x256
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def write_archive(folder: Path, *, series: int, slices: int, rows: int, seed: int = 0) -> int:
    """Write `series` CT series of `slices` slices; return the number of files."""
    import numpy as np
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(seed)
    written = 0
    for s in range(series):
        study, series_uid, frame = generate_uid(), generate_uid(), generate_uid()
        sub = folder / f"series-{s:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 2000, size=(rows, rows), dtype=np.int16)
        for k in rng.permutation(slices):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
            ds.PatientName, ds.PatientID = f"BENCH^{s}", f"B{s:04d}"
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
            ds.FrameOfReferenceUID = frame
            ds.Modality, ds.Manufacturer = "CT", "BENCH"
            ds.ImagePositionPatient = [-250.0, -250.0, 2.5 * float(k)]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.PixelSpacing = [500.0 / rows, 500.0 / rows]
            ds.SliceThickness = 2.5
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.Rows = ds.Columns = rows
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
            ds.PixelData = np.roll(base, int(k), axis=0).tobytes()
            pydicom.dcmwrite(sub / f"{ds.SOPInstanceUID}.dcm", ds, enforce_file_format=True)
            written += 1
    return written


def _files(data: Path) -> list[Path]:
    return sorted(p for p in data.rglob("*.dcm"))


def worker(kind: str, data: Path, cache: Path) -> dict[str, float]:
    """One measurement; imports happen before the clock starts."""
    import numpy as np
    import pydicom
    from pydicom.pixels import apply_rescale

    from federation.dicom.cache import VolumeCache
    from federation.dicom.prepare import prepare_folder

    files = _files(data)
    checksum = 0.0
    if kind == "monai":
        from monai.transforms import LoadImage

        loader = LoadImage(image_only=True, reader="PydicomReader")
    start = time.perf_counter()
    if kind == "bytes":
        checksum = float(sum(len(p.read_bytes()) for p in files))
    elif kind == "naive":
        for p in files:
            ds = pydicom.dcmread(p)
            checksum += float(np.asarray(apply_rescale(ds.pixel_array, ds), np.float32)[0, 0])
    elif kind == "monai":
        for p in files:
            checksum += float(np.asarray(loader(str(p))).ravel()[0])
    elif kind == "cold":
        report = prepare_folder(data, cache)
        checksum = float(len(report.entries))
        if report.problems:
            raise RuntimeError(f"bench archive had problems: {report.problems[:3]}")
    elif kind == "warm":
        store = VolumeCache(cache)
        for entry in json.loads((cache / "manifest.json").read_text()):
            checksum += float(store.get(entry["key"], mmap=False).hu[0, 0, 0])
    else:
        raise ValueError(f"unknown measurement {kind!r}")
    seconds = time.perf_counter() - start
    if kind == "cold":
        report.write(cache)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_mb": peak_mb, "files": len(files), "checksum": checksum}


def _drop_page_cache() -> bool:
    """Empty the OS page cache so the next reads come from the disk; False if not allowed."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except (OSError, subprocess.CalledProcessError):
        return False
    return True


def _run(kind: str, data: Path, cache: Path) -> dict[str, float]:
    disk = kind.endswith("-disk")
    if disk and not _drop_page_cache():
        raise PermissionError("cannot drop the page cache")
    kind = kind.removesuffix("-disk")
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", kind, "--data", str(data), "--cache", str(cache)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed: {proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> int:
    """Run the benchmark (or one worker measurement)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small archive, fewer repeats")
    parser.add_argument("--series", type=int, help="series in the archive")
    parser.add_argument("--slices", type=int, help="slices per series")
    parser.add_argument("--rows", type=int, help="rows (= columns) per slice")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.data), Path(args.cache))))
        return 0
    series = args.series or (4 if args.quick else 8)
    slices = args.slices or (24 if args.quick else 64)
    rows = args.rows or (256 if args.quick else 512)
    repeats = 1 if args.quick else 3
    work = Path(tempfile.mkdtemp(prefix="medfed-prepare-bench-"))
    try:
        small, large = work / "small", work / "large"
        files = write_archive(small, series=series, slices=slices, rows=rows)
        write_archive(large, series=4 * series, slices=slices, rows=rows, seed=1)
        _run("bytes", small, work / "unused")  # warm the page cache for everyone
        best: dict[str, dict[str, float]] = {}

        def measure(kind: str) -> None:  # keeps the fastest of the repeats
            if kind.startswith("cold"):
                shutil.rmtree(work / "cache", ignore_errors=True)
            result = _run(kind, small, work / "cache")
            if kind not in best or result["seconds"] < best[kind]["seconds"]:
                best[kind] = result

        for _ in range(repeats):
            for kind in ("bytes", "naive", "monai", "cold", "warm"):
                measure(kind)
        for kind in ("bytes-disk", "cold-disk"):
            try:
                for _ in range(repeats):
                    measure(kind)
            except PermissionError:
                print(f"  ({kind}: the page cache cannot be dropped here; not measured)")
                break
        mem_small = _run("cold", small, work / "mem-small")["peak_mb"]
        mem_large = _run("cold", large, work / "mem-large")["peak_mb"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    t = {k: v["seconds"] for k, v in best.items()}
    print(f"{files} files ({series} series x {slices} slices of {rows}x{rows}), best of {repeats}")
    for kind, sec in t.items():
        print(f"  {kind:10s} {sec:8.3f} s  {1e3 * sec / files:7.3f} ms/file")
    print(
        f"  peak RSS of cold prepare: {mem_small:.0f} MB ({series} series), "
        f"{mem_large:.0f} MB ({4 * series} series)"
    )
    result = {
        "benchmark": "prepare_speed",
        "files": files,
        "series": series,
        "rows": rows,
        "seconds": {k: round(v, 4) for k, v in t.items()},
        "naive_over_cold": round(t["naive"] / t["cold"], 2),
        "monai_over_cold": round(t["monai"] / t["cold"], 2),
        "cold_over_bytes": round(t["cold"] / t["bytes"], 2),
        "cold_over_warm": round(t["cold"] / t["warm"], 2),
        "cold_over_bytes_disk": (
            round(t["cold-disk"] / t["bytes-disk"], 2) if "cold-disk" in t else None
        ),
        "peak_mb": {str(series): round(mem_small, 1), str(4 * series): round(mem_large, 1)},
        "peak_mb_growth": round(mem_large / mem_small, 3),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
