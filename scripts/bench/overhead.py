#!/usr/bin/env python3
"""Round overhead: what a round costs beyond the slowest site's local training.

For each engine (Flower's simulation engine; a SuperLink and SuperNodes over TLS on
loopback), each consortium size and each amount of local work, in one invocation: medfed
(no DP, so both sides train the same way) and a plain Flower app (`plain_flower`:
Message API, FedAvg, nothing else) that trains the same model on the same sites' data
with the same task code. In deployment medfed runs through its own commands (provision,
`medfed server start`, `medfed site start`, `medfed run federation=deploy`); the plain
app on stock `flower-superlink` / `flower-supernode` with the same TLS certificate.

Every site trains at the same time, as separate hospitals do: each gets an equal share
of this machine's cores (`federation.cpus_per_site` = cores / sites, one torch thread),
so a site's training time includes waiting for the cores the others use, and what is
left of a round is the framework's own time. Overhead share = 1 - slowest site's
training time / the coordinator's training-phase wall time (sending the model to
aggregating the updates), averaged over the rounds after the first (the first also loads
the data); overhead seconds are the difference itself. On shared cores the slowest
site's training starts late when others took the cores first, so the share of the phase
in which no site was training (outside first start to last end) is given too. For medfed
the share of the whole round (training, federated evaluation, tracking, checkpoint) is
also given; the plain app has no other step. A framework's fixed cost per round is
within 5% once local training lasts 19 times that cost: each row gives that break-even.

    python scripts/bench/overhead.py               # both engines; 3 and 10 sites at 1 and 10
                                                   # local epochs, and 3 sites at 50
    python scripts/bench/overhead.py --quick       # both engines, 3 sites, 1 epoch, smaller model
    python scripts/bench/overhead.py --sites 3 --epochs 1 10    # every size at every workload
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import plain_flower
from _runs import kits_of, medfed_deployment, medfed_run, plain_deployment
from plain_flower import SETTINGS_ENV, PlainSettings

# The demo's model without DP (local epochs per run: --epochs); quick: a smaller model.
SETTINGS = ["privacy=none"]
ENGINES = ("simulation", "deployment")
QUICK = ["model.channels=[8,16,32]", "model.strides=[2,2]"]
# (sites, local epochs) measured by default. 3 sites at 50 epochs train 30-40 s a round
# on this machine, closer to a hospital's; 10 sites at 50 would add about 45 minutes.
FULL_ROWS = ((3, 1), (10, 1), (3, 10), (10, 10), (3, 50))
QUICK_ROWS = ((3, 1),)
# Overhead is at most 5% of a round whose local training lasts this many times it.
BREAK_EVEN = 0.95 / 0.05


def plain_settings(
    name: str, n: int, *, work: Path, rounds: int, overrides: list[str]
) -> PlainSettings:
    """The plain app's settings for run `name` of `n` sites."""
    return PlainSettings(
        sites=n,
        rounds=rounds,
        data=str(work / "consortium"),
        state=str(work / "plain-state" / name),
        overrides=overrides,
        cpus_per_site=share_of_cores(n),
        out=str(work / f"{name}-plain-rounds.json"),
    )


def plain_simulation(settings_file: Path) -> None:
    """Run the plain Flower app in this process (simulation engine)."""
    from flwr.simulation import run_simulation

    os.environ[SETTINGS_ENV] = str(settings_file)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    plain = PlainSettings.from_env()
    run_simulation(
        server_app=plain_flower.server,
        client_app=plain_flower.client,
        num_supernodes=plain.sites,
        backend_config={
            "client_resources": {"num_cpus": plain.cpus_per_site, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
        },
    )


def share_of_cores(n: int) -> float:
    """CPU share of each of `n` sites so that all of them train at once."""
    return min(1.0, (os.cpu_count() or 1) / n)


def settings(quick: bool, epochs: int) -> list[str]:
    """Config overrides both apps train with."""
    return [*SETTINGS, *(QUICK if quick else []), f"task.local_epochs={epochs}"]


def share(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Mean overhead over the rounds after the first (of the whole round where known)."""
    from server.loop import idle_share

    later = rounds[1:] or rounds
    out = {
        "overhead_share": statistics.mean(1 - r["slowest"] / r["phase"] for r in later),
        "overhead_seconds": statistics.mean(r["phase"] - r["slowest"] for r in later),
        "phase_seconds": statistics.mean(r["phase"] for r in later),
        "slowest_site_seconds": statistics.mean(r["slowest"] for r in later),
    }
    out["training_for_5_percent_seconds"] = BREAK_EVEN * out["overhead_seconds"]
    if all("span" in r for r in later):
        out["idle_share"] = statistics.mean(
            idle_share(span=r["span"], slowest=r["slowest"], phase=r["phase"]) for r in later
        )
    if all("round" in r for r in later):
        out["round_seconds"] = statistics.mean(r["round"] for r in later)
        out["round_overhead_share"] = statistics.mean(1 - r["slowest"] / r["round"] for r in later)
    return out


def medfed_rounds(history: dict[str, Any]) -> list[dict[str, float]]:
    """Training phase, whole round and slowest site of each round after round 0."""
    return [
        {
            "phase": r["train_phase_seconds"],
            "round": r["seconds"],
            "slowest": r["train"]["train-seconds"],
            "span": r["train"]["train-finished"] - r["train"]["train-started"],
        }
        for r in history["rounds"]
        if r["round"] > 0
    ]


def measure(
    n: int, *, engine: str, epochs: int, work: Path, data: Path, rounds: int, quick: bool
) -> dict[str, Any]:
    """medfed and plain Flower on the same `n` sites, in `engine`."""
    name = f"overhead-{engine}-{n}-e{epochs}"
    overrides = [
        f"rounds={rounds}",
        f"federation.cpus_per_site={share_of_cores(n)}",
        *settings(quick, epochs),
    ]
    plain = plain_settings(name, n, work=work, rounds=rounds, overrides=settings(quick, epochs))
    if engine == "simulation":
        history = medfed_run(
            name, work=work, data=data, overrides=[f"federation.num_sites={n}", *overrides]
        )
        plain.save(work / f"{name}-plain.json")
        subprocess.run(
            [sys.executable, __file__, "--plain", str(work / f"{name}-plain.json")],
            check=True,
            capture_output=True,
        )
        plain_rounds = json.loads(Path(plain.out).read_text())
    else:
        sites = [f"site-{i + 1}" for i in range(n)]
        config = [
            f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
            "tracking.registered_model=",
            *overrides,
        ]
        path = medfed_deployment(name, base=work, data=data, sites=sites, config=config)
        history = json.loads(path.read_text())
        plain_rounds = plain_deployment(
            f"{name}-plain",
            base=work,
            coordinator=kits_of(work / name) / "coordinator",
            settings=plain,
        )
    return {
        "engine": engine,
        "sites": n,
        "local_epochs": epochs,
        "cpus_per_site": share_of_cores(n),
        "medfed": share(medfed_rounds(history)),
        "plain_flower": share(plain_rounds),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sites", nargs="+", type=int, default=None)
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=None)
    parser.add_argument("--epochs", nargs="+", type=int, default=None, help="local epochs")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--work", default=None)
    parser.add_argument("--plain", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain is not None:  # the plain app in the simulation engine, in its own process
        plain_simulation(Path(args.plain))
        return 0
    rounds = args.rounds or (3 if args.quick else 4)
    engines = args.engines or list(ENGINES)
    cases = list(QUICK_ROWS if args.quick else FULL_ROWS)
    if args.sites or args.epochs:
        sizes = args.sites or sorted({n for n, _ in cases})
        cases = list(itertools.product(sizes, args.epochs or sorted({e for _, e in cases})))
    from federation.dicom.synth import generate_consortium

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp).resolve()
        data = work / "consortium"
        generate_consortium(
            data,
            site_names=[f"site-{i + 1}" for i in range(max(n for n, _ in cases))],
            patients_per_site=[3] if args.quick else [12],
            slices=12 if args.quick else 24,
            seed=9,
            skip_existing=True,
        )
        for engine, (n, epochs) in itertools.product(engines, cases):
            row = measure(
                n,
                engine=engine,
                epochs=epochs,
                work=work,
                data=data,
                rounds=rounds,
                quick=args.quick,
            )
            rows.append(row)
            ours, plain = row["medfed"], row["plain_flower"]
            print(
                f"{engine}, {n} sites, {epochs} local epochs: medfed overhead "
                f"{ours['overhead_share']:.1%} of "
                f"{ours['phase_seconds']:.1f} s (whole round {ours['round_overhead_share']:.1%}), "
                f"plain Flower {plain['overhead_share']:.1%} of {plain['phase_seconds']:.1f} s; "
                f"within 5% from {ours['training_for_5_percent_seconds']:.0f} s of training "
                f"(plain {plain['training_for_5_percent_seconds']:.0f} s)",
                flush=True,
            )
    result = {
        "benchmark": "overhead",
        "quick": args.quick,
        "rounds": rounds,
        "rows": rows,
        "within_5_percent": [
            f"{r['engine']}/{r['sites']}/e{r['local_epochs']}"
            for r in rows
            if r["medfed"]["overhead_share"] <= 0.05
        ],
        "medfed_at_most_plain": all(
            r["medfed"]["overhead_share"] <= r["plain_flower"]["overhead_share"] for r in rows
        ),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
