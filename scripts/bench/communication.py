#!/usr/bin/env python3
"""Bytes each site sends per round, against the model's float32 size, and what fp16 costs.

Two `medfed run`s on the same generated consortium with the same settings (DP-SGD,
FedAvg), one sending full weights and one fp16 deltas (`federation.update_encoding`);
the bytes are those of the arrays in the replies the coordinator received.

    python scripts/bench/communication.py            # the demo's settings, 10 rounds
    python scripts/bench/communication.py --quick    # 2 rounds on small images
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from _runs import final_dice, medfed_run

ENCODINGS = ("full", "fp16-delta")
QUICK = ["task.image_size=32", "task.local_epochs=1", "task.batch_size=8"]


def model_float32_bytes() -> int:
    """Size of the shared model's parameters and buffers as float32."""
    from federation.compose import compose_config
    from federation.models import build_model

    model = build_model(compose_config([]).model, seed=0)
    return 4 * sum(v.numel() for v in model.state_dict().values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--work", default=None, help="folder for data and runs (default: temp)")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 10)
    extra = [f"rounds={rounds}", *(QUICK if args.quick else [])]
    from federation.dicom.synth import generate_consortium

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp).resolve()
        data = work / "consortium"
        generate_consortium(
            data,
            site_names=["site-1", "site-2", "site-3"],
            patients_per_site=[3, 3, 4] if args.quick else [16, 12, 20],
            slices=12 if args.quick else 24,
            seed=0,
            skip_existing=True,
        )
        for encoding in ENCODINGS:
            history = medfed_run(
                f"comm-{encoding}",
                work=work,
                data=data,
                overrides=[f"federation.update_encoding={encoding}", *extra],
            )
            sent = [b for r in history["rounds"][1:] for b in r["update_bytes"].values()]
            results[encoding] = {
                "bytes_per_site_round": statistics.mean(sent),
                "final_dice": final_dice(history),
            }
            print(
                f"{encoding:10s} {results[encoding]['bytes_per_site_round'] / 1024:8.1f} KiB "
                f"per site per round, final Dice {results[encoding]['final_dice']:.3f}",
                flush=True,
            )
    size = model_float32_bytes()
    summary = {
        "benchmark": "communication",
        "quick": args.quick,
        "rounds": rounds,
        "model_float32_bytes": size,
        "encodings": {
            k: {**v, "vs_float32_model": v["bytes_per_site_round"] / size}
            for k, v in results.items()
        },
        "fp16_dice_ratio": results["fp16-delta"]["final_dice"] / results["full"]["final_dice"],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
