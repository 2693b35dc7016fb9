#!/usr/bin/env python3
"""Final held-out Dice of each aggregation strategy on the generated multi-vendor consortium.

Every strategy trains the same model on the same synthetic consortium (three vendors,
different calibration, noise and resolution) with the same DP-SGD settings, in its own
`medfed run` process with fresh site budgets. Prints a table, writes a plot of Dice per
round, and on its last line one JSON object with the figures.

    python scripts/bench/strategies.py                 # the demo's settings, 10 rounds
    python scripts/bench/strategies.py --quick         # 2 rounds on small images
    python scripts/bench/strategies.py --strategies fedavg fedbn --rounds 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _runs import final_dice, medfed_run

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedbn", "fedmedian", "krum")
QUICK = ["task.image_size=32", "task.local_epochs=1", "task.batch_size=8"]


def run_strategy(
    strategy: str, *, work: Path, data: Path, rounds: int, extra: list[str]
) -> dict[str, object]:
    """One `medfed run` with `strategy`; its final and best federated Dice per round."""
    try:
        history = medfed_run(
            strategy,
            work=work,
            data=data,
            overrides=[f"strategy={strategy}", f"rounds={rounds}", *extra],
        )
    except RuntimeError as err:
        return {"ok": False, "error": str(err).splitlines()[-1:], "seconds": 0.0}
    dice = [r["evaluate"].get("dice", float("nan")) for r in history["rounds"]]
    return {
        "ok": True,
        "final_dice": final_dice(history),
        "best_dice": max(dice),
        "dice": dice,
        "seconds": history["wall_seconds"],
    }


def plot(results: dict[str, dict[str, object]], path: Path) -> None:
    """Dice per round, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, result in results.items():
        if result["ok"]:
            dice = result["dice"]
            assert isinstance(dice, list)
            ax.plot(range(len(dice)), dice, marker="o", label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("federated held-out Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds on small images")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--plot", default="strategies.png", help="where to write the plot")
    parser.add_argument("--work", default=None, help="folder for data and runs (default: temp)")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 10)
    extra = QUICK if args.quick else []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp).resolve()
        data = work / "consortium"
        if not data.exists():
            # The demo's consortium, generated once and shared by every strategy.
            small = ["data.slices=12", "data.patients_per_site=[3,3,4]"] if args.quick else []
            subprocess.run(
                [sys.executable, "-m", "medfed.cli", "generate", "--output", str(data), *small],
                check=True,
                capture_output=True,
            )
        results = {}
        for strategy in args.strategies:
            results[strategy] = run_strategy(
                strategy, work=work, data=data, rounds=rounds, extra=extra
            )
            r = results[strategy]
            shown = f"{r['final_dice']:.3f} (best {r['best_dice']:.3f})" if r["ok"] else r["error"]
            print(f"{strategy:10s} {shown}  [{r['seconds']:.0f} s]", flush=True)
    plot(results, Path(args.plot))
    print(f"plot: {Path(args.plot).resolve()}")
    summary = {
        "benchmark": "strategies",
        "rounds": rounds,
        "quick": args.quick,
        "final_dice": {k: v.get("final_dice") for k, v in results.items()},
        "best_dice": {k: v.get("best_dice") for k, v in results.items()},
        "failed": sorted(k for k, v in results.items() if not v["ok"]),
    }
    print(json.dumps(summary))
    return 0 if not summary["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
