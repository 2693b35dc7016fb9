#!/usr/bin/env python3
"""How time per round and peak memory grow with the number of simulated sites.

Each size is one `medfed run` process in Flower's simulation engine (DP-SGD on, a small
U-Net, tiny sites: 2 patients x 8 slices), measured side by side in one invocation. Peak
memory is the largest sum of resident memory over the run's whole process tree (the
coordinator, Ray and its site workers), sampled every 0.2 s.

    python scripts/bench/scale.py             # 3, 10, 30 and 100 sites
    python scripts/bench/scale.py --quick     # 3 and 10 sites
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _runs import medfed_run

SMALL_MODEL = [
    "model.channels=[4,8,16]",
    "model.strides=[2,2]",
    "task.image_size=32",
    "task.local_epochs=1",
    "task.batch_size=8",
]


def run_size(n: int, *, work: Path, data: Path, rounds: int) -> dict[str, float]:
    """One run with `n` sites: seconds per round and peak memory of its process tree."""
    history = medfed_run(
        f"scale-{n}",
        work=work,
        data=data,
        overrides=[
            f"rounds={rounds}",
            f"federation.num_sites={n}",
            f"federation.min_sites={max(1, n // 2)}",
            *SMALL_MODEL,
        ],
        measure_memory=True,
    )
    trained = history["rounds"][1:]
    return {
        "sites": n,
        "seconds_per_round": sum(r["seconds"] for r in trained) / len(trained),
        "peak_rss_mb": history["peak_rss_mb"],
        "wall_seconds": history["wall_seconds"],
        "delivered": min(len(r["site_train"]) for r in trained),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 and 10 sites")
    parser.add_argument("--sites", nargs="+", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", default=None, help="folder for data and runs (default: temp)")
    args = parser.parse_args()
    sizes = args.sites or ([3, 10] if args.quick else [3, 10, 30, 100])
    from federation.dicom.synth import generate_consortium

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp).resolve()
        data = work / "consortium"
        names = [f"site-{i + 1}" for i in range(max(sizes))]
        generate_consortium(
            data, site_names=names, patients_per_site=[2], slices=8, seed=5, skip_existing=True
        )
        for n in sizes:
            row = run_size(n, work=work, data=data, rounds=args.rounds)
            rows.append(row)
            print(
                f"{n:4d} sites: {row['seconds_per_round']:7.1f} s/round, "
                f"peak {row['peak_rss_mb']:7.0f} MiB, {row['delivered']} delivered",
                flush=True,
            )
    base = rows[0]
    result = {
        "benchmark": "scale",
        "quick": args.quick,
        "rows": rows,
        "time_growth": {
            str(r["sites"]): r["seconds_per_round"] / base["seconds_per_round"] for r in rows
        },
        "memory_growth": {str(r["sites"]): r["peak_rss_mb"] / base["peak_rss_mb"] for r in rows},
        "seconds_per_site_round": {
            str(r["sites"]): r["seconds_per_round"] / r["sites"] for r in rows
        },
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
