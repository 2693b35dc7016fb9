#!/usr/bin/env python3
"""Round overhead: what a round costs beyond the slowest site's local training.

For each engine (Flower's simulation engine; a SuperLink and SuperNodes over TLS on
loopback), each consortium size and each amount of local work, in one invocation: medfed
(no DP, so both sides train the same way) and a plain Flower app (`plain_flower`:
Message API, FedAvg, nothing else) that trains the same model on the same sites' data
with the same task code. In deployment medfed runs through its own commands (provision,
`medfed server start`, `medfed site start`, `medfed run federation=deploy`); the plain
app on stock `flower-superlink` / `flower-supernode` with the same TLS certificate.
NVIDIA FLARE trains the same tensors with the same model and loop (`nvflare_peer`: its
own venv, made when missing) in its simulator and its POC deployment (mutual TLS), at
its default polling and at 0.1 s. medfed's deployment rows also say where the time goes
(`where_time_goes`: CPU per process role, processes and memory per site, Fleet requests).

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

    python scripts/bench/overhead.py               # simulation and deployment at 3, 10 and
                                                   # 30 sites; 1 local epoch
    python scripts/bench/overhead.py --quick       # deployment, 3 sites, smaller model
    python scripts/bench/overhead.py --engines deployment --sites 3 --epochs 1 10
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
from _profile import SITE_ROLES, ProcessProfile, gate_requests
from _runs import kits_of, medfed_deployment, medfed_run, plain_deployment
from nvflare_peer import export_workload, run_nvflare
from plain_flower import SETTINGS_ENV, PlainSettings

# The demo's model without DP (local epochs per run: --epochs); quick: a smaller model.
SETTINGS = ["privacy=none"]
ENGINES = ("simulation", "deployment")
QUICK = ["model.channels=[8,16,32]", "model.strides=[2,2]"]
# (engine, sites, local epochs) measured by default. Quick: one row.
FULL_ROWS = tuple((engine, n, 1) for engine in ("simulation", "deployment") for n in (3, 10, 30))
# The plain app starts a new Python (torch imported again) for every message: in
# deployment at 30 sites a round would take about ten minutes here, so it stops at 10.
PLAIN_DEPLOYMENT_MAX_SITES = 10
QUICK_ROWS = (("deployment", 3, 1),)
# Overhead is at most 5% of a round whose local training lasts this many times it.
BREAK_EVEN = 0.95 / 0.05
# NVFlare's client task fetch interval and server task check period (s): None is its
# default (0.5 s each); "tuned" polls every 0.1 s.
NVFLARE_POLLS = {"nvflare": None, "nvflare_tuned": 0.1}
PEERS = ("plain_flower", *NVFLARE_POLLS)


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
        profile = ProcessProfile([])
        path = medfed_deployment(
            name, base=work, data=data, sites=sites, config=config, profile=profile
        )
        history = json.loads(path.read_text())
        gate_log = kits_of(work / name) / "coordinator" / "superlink-home" / "gate-access.log"
        plain_rounds = (
            plain_deployment(
                f"{name}-plain",
                base=work,
                coordinator=kits_of(work / name) / "coordinator",
                settings=plain,
            )
            if n <= PLAIN_DEPLOYMENT_MAX_SITES
            else None
        )
    row: dict[str, Any] = {
        "engine": engine,
        "sites": n,
        "local_epochs": epochs,
        "cpus_per_site": share_of_cores(n),
        "medfed": share(medfed_rounds(history)),
    }
    if plain_rounds is not None:
        row["plain_flower"] = share(plain_rounds)
    if engine == "deployment":
        row["medfed"]["where"] = where_time_goes(profile, history, gate_log, sites=n)
    from client.site import torch_threads

    workload = export_workload(
        work / f"{name}-workload",
        data=data,
        state=work / "nvflare-state",
        sites=[f"site-{i + 1}" for i in range(n)],
        overrides=settings(quick, epochs),
        threads=torch_threads(share_of_cores(n)),
    )
    for peer, poll in NVFLARE_POLLS.items():
        try:
            flare = run_nvflare(
                workload, engine=engine, sites=n, rounds=rounds, work=work / f"{name}-{peer}",
                poll=poll,
            )  # fmt: skip
        except RuntimeError as error:  # kept in the row: the other rows still run
            print(f"{engine}, {n} sites: {peer} failed: {error}", file=sys.stderr, flush=True)
            row[peer] = {"failed": str(error)}
            continue
        row[peer] = share(flare)
    return row


def measure_row(
    engine: str, n: int, epochs: int, *, work: Path, sites: int, rounds: int, quick: bool
) -> dict[str, Any]:
    """One row: the consortium's first `sites` sites made when missing, then `measure`."""
    from federation.dicom.synth import generate_consortium

    data = work / "consortium"
    generate_consortium(
        data,
        site_names=[f"site-{i + 1}" for i in range(sites)],
        patients_per_site=[3] if quick else [12],
        slices=12 if quick else 24,
        seed=9,
        skip_existing=True,
    )
    return measure(
        n, engine=engine, epochs=epochs, work=work, data=data, rounds=rounds, quick=quick
    )


def measure_apart(
    engine: str, n: int, epochs: int, *, work: Path, sites: int, rounds: int, quick: bool
) -> dict[str, Any]:
    """`measure_row` in a new Python process.

    A row's memory (torch, the simulation's sites, NVFlare's workload) goes with its
    process: 30 deployed sites take nearly all of this machine's memory, and the earlier
    rows' leftovers in one process (about 0.6 GB) pushed it into reclaiming code pages,
    which slowed training tenfold.
    """
    done = subprocess.run(
        [
            sys.executable, __file__, "--row", engine, str(n), str(epochs), str(sites),
            "--work", str(work), "--rounds", str(rounds), *(["--quick"] if quick else []),
        ],
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )  # fmt: skip
    row: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return row


def where_time_goes(
    profile: ProcessProfile, history: dict[str, Any], gate_log: Path, *, sites: int
) -> dict[str, Any]:
    """A deployment's CPU per round by role, its processes and memory, its requests.

    Measured from the start of round 2's training to the start of the last round's, a
    whole number of rounds (training, evaluation, tracking) in the steady state.
    """
    rounds = [r for r in history["rounds"] if r["round"] >= 2]
    start, end = rounds[0]["train"]["train-started"], rounds[-1]["train"]["train-started"]
    periods = max(1, rounds[-1]["round"] - rounds[0]["round"])
    cpu = {k: v / periods for k, v in profile.cpu_between(start, end).items() if v > 0.005}
    requests = gate_requests(gate_log, start, end)
    fleet = sum(r["requests"] for r in requests.values()) / periods
    processes = profile.processes()
    pss = profile.pss_mb()
    return {
        "round_seconds": (end - start) / periods,
        "cpu_seconds_per_round": dict(sorted(cpu.items(), key=lambda kv: -kv[1])),
        # Most processes of one site at once (its run's ClientApp among them).
        "processes_per_site": sum(processes.get(r, 0) for r in SITE_ROLES) / sites,
        "site_pss_mb": sum(pss.get(r, 0.0) for r in SITE_ROLES) / sites,
        "coordinator_pss_mb": sum(v for r, v in pss.items() if r not in SITE_ROLES),
        "fleet_requests_per_round": fleet,
        # TLS handshakes with the gate (a request that was the first on its connection).
        "fleet_connections_per_round": sum(r["connections"] for r in requests.values()) / periods,
        "fleet_requests": {
            path: {"per_round": v["requests"] / periods, "mean_ms": 1000 * v["mean_seconds"]}
            for path, v in sorted(requests.items(), key=lambda kv: -kv[1]["requests"])
        },
        # The Fleet requests' share of the SuperLink's CPU is not separable here: this
        # is an upper bound (the ServerApp's own requests are answered too).
        "superlink_cpu_ms_per_fleet_request": 1000 * cpu.get("superlink", 0.0) / max(fleet, 1),
        # This profile's own cost, which NVFlare's runs (not profiled) do not pay.
        "profiler_cpu_per_second": profile.cost_per_second(),
    }


def at_most_nvflare(row: dict[str, Any]) -> bool:
    """medfed's overhead and training phase are at most NVFlare's best in `row`.

    Judged on the NVFlare runs that finished; False when none did.
    """
    finished = [row[peer] for peer in NVFLARE_POLLS if "failed" not in row[peer]]
    return bool(finished) and all(
        row["medfed"][key] <= min(peer[key] for peer in finished)
        for key in ("overhead_seconds", "phase_seconds")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sites", nargs="+", type=int, default=None)
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=None)
    parser.add_argument("--epochs", nargs="+", type=int, default=None, help="local epochs")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--work", default=None)
    parser.add_argument("--plain", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--row", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain is not None:  # the plain app in the simulation engine, in its own process
        plain_simulation(Path(args.plain))
        return 0
    if args.row is not None:  # one row, in its own process (`measure_apart`)
        engine, n, epochs, sites = args.row
        print(json.dumps(measure_row(
            engine, int(n), int(epochs), work=Path(args.work), sites=int(sites),
            rounds=args.rounds, quick=args.quick,
        )))  # fmt: skip
        return 0
    rounds = args.rounds or (3 if args.quick else 4)
    cases = list(QUICK_ROWS if args.quick else FULL_ROWS)
    if args.sites or args.epochs or args.engines:
        engines = args.engines or sorted({e for e, _, _ in cases})
        sizes = args.sites or sorted({n for _, n, _ in cases})
        epochs = args.epochs or sorted({k for _, _, k in cases})
        cases = list(itertools.product(engines, sizes, epochs))
    sites = max(n for _, n, _ in cases)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp).resolve()
        for engine, n, epochs in cases:
            row = measure_apart(
                engine, n, epochs, work=work, sites=sites, rounds=rounds, quick=args.quick
            )
            rows.append(row)
            ours = row["medfed"]
            others = ", ".join(
                f"{p} failed"
                if "failed" in row[p]
                else f"{p} {row[p]['overhead_seconds']:.2f} s of {row[p]['phase_seconds']:.1f} s"
                for p in PEERS
                if p in row
            )
            print(
                f"{engine}, {n} sites, {epochs} local epochs: medfed overhead "
                f"{ours['overhead_seconds']:.2f} s of {ours['phase_seconds']:.1f} s "
                f"({ours['overhead_share']:.1%}; whole round {ours['round_overhead_share']:.1%}); "
                f"{others}",
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
            r["medfed"]["overhead_share"] <= r["plain_flower"]["overhead_share"]
            for r in rows
            if "plain_flower" in r
        ),
        # The bar: medfed's overhead and training phase at most NVFlare's best.
        "medfed_at_most_nvflare": all(at_most_nvflare(r) for r in rows),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
