#!/usr/bin/env python3
"""De-identification throughput against a plain pydicom read of the same files.

Writes an identified synthetic archive (what a hospital's PACS holds: names, dates,
institution, original UIDs; CT series with their SEG), then, each in its own process on
the same files with the page cache warm:

- read:   `pydicom.dcmread` of every file (pixel data included), nothing else;
- copy:   read and write each file with pydicom, unchanged (the floor for any copy);
- deid:   `medfed site deidentify`'s path: read, PS3.15 Basic Profile with modified
          dates, pseudonym map, write the copy;
- memory: peak RSS of de-identifying N and 4N patients (it must not grow with N).

    python scripts/bench/deid.py            # 8 patients x 64 slices (the site profile's matrix)
    python scripts/bench/deid.py --quick    # 2 patients x 12 slices
The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROFILE = "basic,retain-long-modified-dates"


def write_archive(folder: Path, *, patients: int, slices: int) -> int:
    """An identified site of `patients` CT series with SEG; the number of files."""
    from federation.dicom.synth import generate_consortium

    generate_consortium(
        folder, site_names=["site-1"], patients_per_site=[patients], slices=slices,
        seed=0, identified=True,
    )  # fmt: skip
    return sum(1 for p in (folder / "site-1").rglob("*.dcm"))


def child(kind: str, source: Path, work: Path) -> None:
    """One measurement in this process: seconds and peak RSS (MiB) as JSON."""
    import pydicom

    from client.deidentify import deidentify_source
    from federation.dicom.deidentify import parse_profile
    from federation.dicom.profile import action

    action(0)  # the profile's table is loaded once per process, before the clock
    started = time.perf_counter()  # imports are not counted
    if kind == "read":
        for path in sorted(source.rglob("*.dcm")):
            pydicom.dcmread(path).PixelData  # noqa: B018
    elif kind == "copy":
        (work / "copy").mkdir()
        for k, path in enumerate(sorted(source.rglob("*.dcm"))):
            pydicom.dcmread(path).save_as(work / "copy" / f"{k}.dcm")
    else:
        report = deidentify_source(
            str(source), work / "out", state_dir=work / "state", options=parse_profile(PROFILE)
        )
        assert not report.problems, report.summary()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mb": peak}))


def measure(kind: str, source: Path, work: Path) -> dict[str, float]:
    """Run `child` in a fresh process."""
    work.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(source), str(work)],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 patients x 12 slices")
    parser.add_argument(
        "--child", nargs=3, metavar=("KIND", "SOURCE", "WORK"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return 0
    patients, slices = (2, 12) if args.quick else (8, 64)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = write_archive(work / "small", patients=patients, slices=slices)
        big_files = write_archive(work / "big", patients=4 * patients, slices=slices)
        source = work / "small" / "site-1"
        measure("read", source, work / "warm")  # warm the page cache
        read = measure("read", source, work / "r")
        copy = measure("copy", source, work / "c")
        deid = measure("deid", source, work / "d")
        big = measure("deid", work / "big" / "site-1", work / "b")
    rows = {
        "read": files / read["seconds"],
        "copy": files / copy["seconds"],
        "deid": files / deid["seconds"],
    }
    print(f"{files} files ({patients} patients x {slices} slices + SEG), profile {PROFILE}")
    for name, rate in rows.items():
        print(f"  {name:5s} {rate:8.1f} files/s")
    ratio = deid["seconds"] / read["seconds"]
    growth = big["peak_mb"] / deid["peak_mb"]
    vs_copy = deid["seconds"] / copy["seconds"]
    print(f"de-identify / read time: x{ratio:.2f}; de-identify / copy time: x{vs_copy:.2f}")
    print(
        f"peak RSS: {files} files {deid['peak_mb']:.0f} MiB, {big_files} files "
        f"{big['peak_mb']:.0f} MiB (x{growth:.3f})"
    )
    print(
        json.dumps(
            {
                "benchmark": "deid",
                "quick": args.quick,
                "files": files,
                "profile": PROFILE,
                "read_files_per_s": round(rows["read"], 1),
                "deid_files_per_s": round(rows["deid"], 1),
                "copy_files_per_s": round(rows["copy"], 1),
                "deid_vs_read_time": round(ratio, 3),
                "deid_vs_copy_time": round(vs_copy, 3),
                "peak_mb": {
                    str(files): round(deid["peak_mb"]),
                    str(big_files): round(big["peak_mb"]),
                },
                "memory_growth_4x": round(growth, 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
