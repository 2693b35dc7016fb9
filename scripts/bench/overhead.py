#!/usr/bin/env python3
"""Round overhead: what a round costs beyond the slowest site's local training.

For each consortium size, in one invocation: a `medfed run` (no DP, so both sides train
the same way) and a plain Flower app (Message API, FedAvg, no validation, no ledgers, no
tracking, no packing) that trains the same model on the same sites' data with the same
task code, both in Flower's simulation engine. Every site trains at the same time, as
separate hospitals do: each gets an equal share of this machine's cores
(`federation.cpus_per_site` = cores / sites, one torch thread), so a site's training
wall time includes waiting for the cores the others use and what is left of a round is
the framework's own time. Overhead share = 1 - slowest site's training time / the
coordinator's training-phase wall time (sending the model to aggregating the updates),
averaged over the rounds after the first (the first also loads the data). For medfed the
share of the whole round (training, federated evaluation, tracking, checkpoint) is also
given; the plain app has no other step.

    python scripts/bench/overhead.py               # 3 and 10 sites, 4 rounds
    python scripts/bench/overhead.py --quick       # 3 sites, 3 rounds
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _runs import medfed_run

# The demo's model and local work, without DP; quick: a smaller model and one epoch.
SETTINGS = ["privacy=none"]
QUICK = ["task.local_epochs=1", "model.channels=[8,16,32]", "model.strides=[2,2]"]


def plain_flower(
    n: int, *, data: Path, state: Path, rounds: int, out: Path, settings: list[str]
) -> None:
    """Run the plain Flower app in this process (simulation engine); rounds go to `out`."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from client.site import SiteIdentity, load_site_dataset, torch_threads
    from federation.config import compose_config
    from federation.models import build_model
    from federation.tasks import get_task

    cfg = compose_config(settings)
    cpus = share_of_cores(n)
    names = [f"site-{i + 1}" for i in range(n)]
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        name = names[int(context.node_config["partition-id"])]
        torch.set_num_threads(torch_threads(cpus))
        task = get_task(cfg.task.name)
        site = SiteIdentity(name, data / name, state / name)
        dataset = load_site_dataset(site, task, cfg.task, seed=cfg.seed).data
        model = build_model(cfg.model)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        started = time.perf_counter()
        outcome = task.train(model, dataset, cfg.task, cfg.privacy, seed=cfg.seed)
        seconds = time.perf_counter() - started
        metrics = {"num-examples": outcome.num_examples, "train-seconds": seconds}
        content = RecordDict(
            {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}
        )
        return Message(content=content, reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
        arrays = ArrayRecord(build_model(cfg.model, seed=cfg.seed).state_dict())
        records = []
        for server_round in range(1, rounds + 1):
            started = time.perf_counter()
            replies = list(
                grid.send_and_receive(
                    strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
                )
            )
            new, _ = strategy.aggregate_train(server_round, replies)
            phase = time.perf_counter() - started
            arrays = new if new is not None else arrays
            slowest = max(float(m.content["metrics"]["train-seconds"]) for m in replies)
            records.append({"phase": phase, "slowest": slowest})
        out.write_text(json.dumps(records))

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=n,
        backend_config={
            "client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
        },
    )


def share_of_cores(n: int) -> float:
    """CPU share of each of `n` sites so that all of them train at once."""
    return min(1.0, (os.cpu_count() or 1) / n)


def settings(quick: bool) -> list[str]:
    """Config overrides both apps train with."""
    return [*SETTINGS, *(QUICK if quick else [])]


def share(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Mean overhead over the rounds after the first (of the whole round where known)."""
    later = rounds[1:] or rounds
    out = {
        "overhead_share": statistics.mean(1 - r["slowest"] / r["phase"] for r in later),
        "phase_seconds": statistics.mean(r["phase"] for r in later),
        "slowest_site_seconds": statistics.mean(r["slowest"] for r in later),
    }
    if all("round" in r for r in later):
        out["round_seconds"] = statistics.mean(r["round"] for r in later)
        out["round_overhead_share"] = statistics.mean(1 - r["slowest"] / r["round"] for r in later)
    return out


def measure(n: int, *, work: Path, data: Path, rounds: int, quick: bool) -> dict[str, Any]:
    """medfed and plain Flower on the same `n` sites."""
    history = medfed_run(
        f"overhead-{n}",
        work=work,
        data=data,
        overrides=[
            f"rounds={rounds}",
            f"federation.num_sites={n}",
            f"federation.cpus_per_site={share_of_cores(n)}",
            *settings(quick),
        ],
    )
    ours = share(
        [
            {
                "phase": r["train_phase_seconds"],
                "round": r["seconds"],
                "slowest": r["train"]["train-seconds"],
            }
            for r in history["rounds"][1:]
        ]
    )
    out = work / f"plain-{n}.json"
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--plain",
            str(n),
            "--rounds",
            str(rounds),
            "--work",
            str(work),
            *(["--quick"] if quick else []),
        ],
        check=True,
        capture_output=True,
    )
    plain = share(json.loads(out.read_text()))
    return {"sites": n, "cpus_per_site": share_of_cores(n), "medfed": ours, "plain_flower": plain}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sites", nargs="+", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--work", default=None)
    parser.add_argument("--plain", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 4)
    if args.plain is not None:  # the plain Flower app, in its own process
        work = Path(args.work)
        plain_flower(
            args.plain,
            data=work / "consortium",
            state=work / "plain-state",
            rounds=rounds,
            out=work / f"plain-{args.plain}.json",
            settings=settings(args.quick),
        )
        return 0
    sizes = args.sites or ([3] if args.quick else [3, 10])
    from federation.dicom.synth import generate_consortium

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp).resolve()
        data = work / "consortium"
        generate_consortium(
            data,
            site_names=[f"site-{i + 1}" for i in range(max(sizes))],
            patients_per_site=[3] if args.quick else [12],
            slices=12 if args.quick else 24,
            seed=9,
            skip_existing=True,
        )
        for n in sizes:
            row = measure(n, work=work, data=data, rounds=rounds, quick=args.quick)
            rows.append(row)
            print(
                f"{n:3d} sites: medfed overhead {row['medfed']['overhead_share']:.1%} of "
                f"{row['medfed']['phase_seconds']:.1f} s (whole round "
                f"{row['medfed']['round_overhead_share']:.1%}), plain Flower "
                f"{row['plain_flower']['overhead_share']:.1%} of "
                f"{row['plain_flower']['phase_seconds']:.1f} s",
                flush=True,
            )
    print(
        json.dumps(
            {
                "benchmark": "overhead",
                "quick": args.quick,
                "engine": "simulation",
                "rounds": rounds,
                "rows": rows,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
