#!/usr/bin/env python3
"""Site inference: series per second, ms per slice, where the time goes, flat memory.

`medfed site predict` (in-process, as a site runs it) on generated CT series at the
demo's size, with a model package of the demo's network (seg2d U-Net, 64 px): weights do
not change the speed, so none are trained here. Each result is stored over STOW-RS to a
real Orthanc when one is installed (as CI installs it), else only written to disk.

- speed: series per second, ms per slice, and the shares of the total spent decoding and
  preprocessing, in the model, encoding the SEG, and storing it;
- memory: peak RSS of a process predicting N series and of one predicting 4N, side by
  side (streaming keeps the ratio near 1);
- with `--run RUN_DIR --data ROOT` (a finished run and its consortium): the Dice of the
  written SEGs against the ground-truth SEGs on every site's held-out patients, beside
  the Dice the run reported for its best round.

    python scripts/bench/predict.py            # 8 series x 32 slices, 4x for memory
    python scripts/bench/predict.py --quick    # 2 series x 12 slices
    python scripts/bench/predict.py --run outputs/RUN --data consortium
The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _runs import ROOT

FULL = {"series": 8, "slices": 32}
QUICK = {"series": 2, "slices": 12}


def make_model(path: Path) -> Path:
    """A package of the demo's network (default config), untrained."""
    from federation.compose import compose_config
    from federation.modelpack import ModelCard, ModelPackage
    from federation.models import build_model

    cfg = compose_config([])
    network = build_model(cfg.model, seed=0)
    card = ModelCard("medfed-seg2d", "bench", "bench", 0, "0" * 64)
    return ModelPackage(cfg.task, cfg.model, network.state_dict(), card).save(path)


def make_series(folder: Path, *, series: int, slices: int) -> Path:
    """`series` CT series (one per patient) of one generated site."""
    from federation.dicom.synth import generate_consortium

    generate_consortium(folder, site_names=["s"], patients_per_site=[series], slices=slices, seed=1)
    return folder / "s"


def predict_once(model: Path, source: Path, output: Path, store_to: str | None) -> dict[str, Any]:
    """One prediction run in this process; its figures and this process's peak RSS."""
    from client.predict import predict
    from federation.modelpack import ModelPackage

    report = predict(ModelPackage.load(model), str(source), output, store_to=store_to)
    return {
        "series": len(report.results),
        "slices": report.slices,
        "seconds": report.seconds,
        "quarantined": len(report.problems),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def in_subprocess(model: Path, source: Path, output: Path, store_to: str | None) -> dict[str, Any]:
    """`predict_once` in a fresh process (so peak memory is its own)."""
    args = [sys.executable, __file__, "--child", str(model), str(source), str(output)]
    proc = subprocess.run(
        [*args, store_to or ""], capture_output=True, text=True, check=False, cwd=ROOT
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def held_out_dice(run_dir: Path, data: Path, work: Path) -> dict[str, Any]:
    """Dice of the SEGs written for each site's held-out patients, as the run scores it.

    The run's figure: Dice per held-out volume, averaged per site, weighted by the
    site's held-out slices (how the coordinator aggregates); the same here, on the
    series' own grid.
    """
    import highdicom as hd
    import numpy as np

    from client.predict import predict
    from federation.dicom.prepare import labelled_volumes
    from federation.modelpack import ModelPackage
    from federation.tasks.base import split_patients
    from federation.tasks.metrics import dice
    from server.loop import RunHistory

    package = ModelPackage.load(run_dir / "model.medfed.pt")
    history = RunHistory.load(run_dir / "history.json")
    best = next(r for r in history.rounds if r.round == package.card.round)
    config = json.loads((run_dir / "config.json").read_text())
    weighted, slices = 0.0, 0
    for site in history.sites:
        volumes, _ = labelled_volumes(data / site, work / "cache" / site)
        held = split_patients(
            sorted({v.patient_key for v in volumes}), package.task.val_fraction, seed=config["seed"]
        )
        report = predict(package, str(data / site), work / "predicted" / site)
        written = {r.series_uid: r.path for r in report.results}
        scores = []
        for volume in (v for v in volumes if v.patient_key in held):
            seg = hd.seg.segread(written[volume.series_uid])
            mask = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=volume.sop_uids,
                combine_segments=True,
                assert_missing_frames_are_empty=True,
            )
            scores.append(dice(np.asarray(mask) > 0, volume.label))
        site_slices = sum(int(v.hu.shape[0]) for v in volumes if v.patient_key in held)
        weighted += float(np.mean(scores)) * site_slices
        slices += site_slices
    return {
        "written_segs": weighted / slices,
        "run_reported": best.evaluate["dice"],
        "round": package.card.round,
        "difference": abs(weighted / slices - best.evaluate["dice"]),
    }


def _orthanc(work: Path) -> Any:
    from tests.orthanc import ORTHANC, running_orthanc

    return running_orthanc(work) if ORTHANC else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 series of 12 slices")
    parser.add_argument("--run", type=Path, help="a finished run's folder: check its Dice")
    parser.add_argument("--data", type=Path, help="the run's consortium (with --run)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.child:
        model, source, output, store_to = args.child
        print(json.dumps(predict_once(Path(model), Path(source), Path(output), store_to or None)))
        return
    size = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="medfed-bench-predict-") as tmp:
        work = Path(tmp)
        model = make_model(work / "model.medfed.pt")
        small = make_series(work / "small", series=size["series"], slices=size["slices"])
        large = make_series(work / "large", series=4 * size["series"], slices=size["slices"])
        (work / "orthanc").mkdir()
        pacs = _orthanc(work / "orthanc")
        with pacs if pacs is not None else contextlib.nullcontext() as running:
            store_to = running.dicomweb if running is not None else None
            one = in_subprocess(model, small, work / "out-small", store_to)
            four = in_subprocess(model, large, work / "out-large", store_to)
        dice = held_out_dice(args.run, args.data, work) if args.run else None
    total = sum(four["seconds"].values())
    result = {
        "benchmark": "predict",
        "series": four["series"],
        "slices_per_series": size["slices"],
        "stored_to": "orthanc-dicomweb" if store_to else "disk only",
        "series_per_second": four["series"] / total,
        "ms_per_slice": 1000 * total / four["slices"],
        "shares": {stage: s / total for stage, s in four["seconds"].items()},
        "model_share": four["seconds"]["model"] / total,
        "peak_rss_mb": {
            str(one["series"]): one["peak_rss_mb"],
            str(four["series"]): four["peak_rss_mb"],
        },
        "memory_ratio_4x_series": four["peak_rss_mb"] / one["peak_rss_mb"],
        "dice": dice,
    }
    shares = ", ".join(f"{k} {v:.0%}" for k, v in result["shares"].items())
    print(
        f"{result['series']} series x {size['slices']} slices ({result['stored_to']}): "
        f"{result['series_per_second']:.2f} series/s, {result['ms_per_slice']:.1f} ms/slice; "
        f"{shares}"
    )
    print(
        f"peak RSS {one['peak_rss_mb']:.0f} MiB for {one['series']} series, "
        f"{four['peak_rss_mb']:.0f} MiB for {four['series']} "
        f"(x{result['memory_ratio_4x_series']:.2f})"
    )
    if dice:
        print(
            f"held-out Dice of the written SEGs {dice['written_segs']:.4f} vs the run's "
            f"{dice['run_reported']:.4f} (round {dice['round']}): "
            f"difference {dice['difference']:.4f}"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
