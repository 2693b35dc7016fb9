"""Time per round: 3 sites on a SuperLink over TLS (loopback) vs the simulation engine.

All runs use the same config (small U-Net task, DP-SGD, 3 synthetic sites). The
deployment runs go through the product path: `medfed provision`, `medfed server start`,
three `medfed site start`, `medfed run federation=deploy`; once with warm ClientApps
(medfed's default: forked from a process that imported them) and once cold (a new
Python per message, as Flower does). Round times are the coordinator's own
(`history.json`, round 1 onwards; round 0 is the initial evaluation); the overhead
share is the part of the training phase not spent in the slowest site's training.

    python scripts/bench/deploy_rounds.py [--quick] [--rounds N]

The last line is JSON: median seconds per round and overhead share in each engine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _runs import bench_env, medfed, medfed_deployment

from server.loop import RoundRecord, RunHistory

SITES = ["site-1", "site-2", "site-3"]


def _rounds(history: Path) -> list[RoundRecord]:
    """The coordinator's rounds 1 onwards (round 0 is the initial evaluation)."""
    return [r for r in RunHistory.load(history).rounds if r.round > 0]


def _summary(rounds: list[RoundRecord]) -> dict[str, float]:
    shares = [r.overhead_share for r in rounds if r.overhead_share is not None]
    return {
        "round_s": round(statistics.median(r.seconds for r in rounds), 2),
        "overhead_share": round(statistics.median(shares), 3),
    }


def deployment(work: Path, data: Path, config: list[str], *, warm: bool) -> list[RoundRecord]:
    """The three sites on a SuperLink over TLS; the coordinator's rounds."""
    name = "deploy-warm" if warm else "deploy-cold"
    history = medfed_deployment(name, base=work, data=data, sites=SITES, config=config, warm=warm)
    rounds = _rounds(history)
    print(f"{name} s/round: {[r.seconds for r in rounds]}", file=sys.stderr)
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds (default 3)")
    parser.add_argument("--rounds", type=int, default=0)
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 3)
    work = Path(tempfile.mkdtemp(prefix="medfed-deploy-bench-"))
    data = work / "consortium"
    config = [
        f"rounds={rounds}",
        "task.image_size=32",
        "task.local_epochs=1",
        "task.batch_size=8",
        "data.patients_per_site=[3,3,4]",
        "data.slices=12",
        "seed=3",
        f"data.root={data}",
        "data.generate=false",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
    ]
    subprocess.run(
        [sys.executable, "-m", "medfed.cli", "generate", "--output", str(data), *config],
        cwd=work, env=bench_env(), check=True, capture_output=True,
    )  # fmt: skip
    print(f"work folder {work}", file=sys.stderr)

    sim_out = work / "sim"
    proc = medfed(
        "run", *config, "run_name=sim", f"output_dir={sim_out}",
        f"federation.site_state_root={work / 'sim-state'}", cwd=work, log=work / "sim.log",
    )  # fmt: skip
    if proc.wait(timeout=1800) != 0:
        sys.exit(f"simulation failed; see {work / 'sim.log'}")
    simulation = _rounds(sim_out / "sim" / "history.json")
    print(f"simulation s/round: {[r.seconds for r in simulation]}", file=sys.stderr)
    warm = deployment(work, data, config, warm=True)
    cold = deployment(work, data, config, warm=False)
    result = {
        "benchmark": "deploy_rounds",
        "rounds": rounds,
        "sites": len(SITES),
        "simulation": _summary(simulation),
        "deployment_warm": _summary(warm),
        "deployment_cold": _summary(cold),
        "cpus": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }
    result["warm_over_cold_round"] = round(
        result["deployment_warm"]["round_s"] / result["deployment_cold"]["round_s"], 3
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
