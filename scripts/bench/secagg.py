#!/usr/bin/env python3
"""Cost of Flower SecAgg+ per training round: bytes moved and seconds, with and without.

Runs the same federated training (same synthetic sites, seed and DP-SGD settings) twice
in Flower's simulation engine, plain and with `federation.secure_aggregation=secaggplus`,
and reads the coordinator's per-round traffic (serialised message bytes to and from the
sites in the training step) and the training step's wall time from each run's history.
Prints a table and, on its last line, one JSON object with the headline figures.

    python scripts/bench/secagg.py            # 4 sites, 64x64 slices, 3 rounds
    python scripts/bench/secagg.py --quick    # 4 sites, 32x32 slices, 2 rounds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from _runs import medfed_run

ROOT = Path(__file__).resolve().parents[2]
MODES = {"plain": "none", "secaggplus": "secaggplus"}


def _summary(history: dict[str, Any]) -> dict[str, Any]:
    """Per-round training traffic and time of one run's history."""
    rounds = [r for r in history["rounds"] if r["round"] > 0]
    per_round = [r["traffic"] for r in rounds]
    return {
        "sites_trained": len({s for r in rounds for s in r["site_train"]}),
        "train_seconds_per_round": statistics.mean(t["train-seconds"] for t in per_round),
        "bytes_to_sites_per_round": statistics.mean(t["train-bytes-sent"] for t in per_round),
        "bytes_from_sites_per_round": statistics.mean(t["train-bytes-received"] for t in per_round),
        "rounds": per_round,
        "run_seconds": history["wall_seconds"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small images, two rounds")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: temp)")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 3)
    size, slices, patients = (32, 8, 2) if args.quick else (64, 12, 3)
    sys.path.insert(0, str(ROOT))
    from federation.config import ModelConfig
    from federation.dicom.synth import generate_consortium
    from federation.models import build_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        names = [f"site-{i + 1}" for i in range(args.sites)]
        generate_consortium(
            work / "data",
            site_names=names,
            patients_per_site=[patients] * args.sites,
            slices=slices,
            seed=0,
            skip_existing=True,
        )
        common = [
            f"rounds={rounds}",
            f"task.image_size={size}",
            "task.local_epochs=1",
            "task.batch_size=8",
            f"federation.num_sites={args.sites}",
            "federation.site_budget=100",
        ]
        results = {
            mode: _summary(
                medfed_run(
                    mode,
                    work=work,
                    data=work / "data",
                    overrides=[*common, f"federation.secure_aggregation={value}"],
                )
            )
            for mode, value in MODES.items()
        }
    model = build_model(ModelConfig())
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    plain, secure = results["plain"], results["secaggplus"]
    print(f"{args.sites} sites, {rounds} rounds, model {model_bytes / 1e6:.2f} MB (float32)")
    print(f"{'mode':<12}{'train s/round':>15}{'MB to sites':>14}{'MB from sites':>15}")
    for mode, r in results.items():
        print(
            f"{mode:<12}{r['train_seconds_per_round']:>15.2f}"
            f"{r['bytes_to_sites_per_round'] / 1e6:>14.3f}"
            f"{r['bytes_from_sites_per_round'] / 1e6:>15.3f}"
        )
    summary = {
        "benchmark": "secagg",
        "sites": args.sites,
        "rounds": rounds,
        "image_size": size,
        "model_bytes": model_bytes,
        "plain": plain,
        "secaggplus": secure,
        "time_ratio": secure["train_seconds_per_round"] / plain["train_seconds_per_round"],
        "bytes_ratio": (
            (secure["bytes_to_sites_per_round"] + secure["bytes_from_sites_per_round"])
            / (plain["bytes_to_sites_per_round"] + plain["bytes_from_sites_per_round"])
        ),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
