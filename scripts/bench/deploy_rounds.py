"""Time per round: 3 sites on a SuperLink over TLS (loopback) vs the simulation engine.

Both runs use the same config (small U-Net task, DP-SGD, 3 synthetic sites). The
deployment run goes through the product path: `medfed provision`, `medfed server start`,
three `medfed site start`, `medfed run federation=deploy`. Round times are the
coordinator's own (`history.json`, round 1 onwards; round 0 is the initial evaluation).

    python scripts/bench/deploy_rounds.py [--quick] [--rounds N]

The last line is JSON: median seconds per round in each engine and their difference.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SITES = ["site-1", "site-2", "site-3"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _medfed(*args: str, cwd: Path, log: Path | None = None) -> subprocess.Popen[bytes]:
    out = log.open("wb") if log else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-m", "federation.cli", *args],
        cwd=cwd,
        env=_env(),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=20)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _round_seconds(history: Path) -> list[float]:
    rounds = json.loads(history.read_text())["rounds"]
    return [float(r["seconds"]) for r in rounds if r["round"] > 0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
        [sys.executable, "-m", "federation.cli", "generate", "--output", str(data), *config],
        cwd=work, env=_env(), check=True, capture_output=True,
    )  # fmt: skip
    print(f"work folder {work}", file=sys.stderr)

    sim_out = work / "sim"
    proc = _medfed(
        "run", *config, "run_name=sim", f"output_dir={sim_out}",
        f"federation.site_state_root={work / 'sim-state'}", cwd=work, log=work / "sim.log",
    )  # fmt: skip
    if proc.wait(timeout=1800) != 0:
        sys.exit(f"simulation failed; see {work / 'sim.log'}")
    simulation = _round_seconds(sim_out / "sim" / "history.json")
    print(f"simulation rounds: {simulation}", file=sys.stderr)

    port = _free_port()
    (work / "consortium.yaml").write_text(
        json.dumps(
            {
                "name": "bench",
                "coordinator": {"address": f"127.0.0.1:{port}"},
                "budget": {"max_epsilon": 100.0, "delta": 1e-5},
                "sites": SITES,
            }
        )
    )
    kits = work / "kits"
    if _medfed("provision", "consortium.yaml", "--output", str(kits), cwd=work).wait() != 0:
        sys.exit("provisioning failed")
    procs = [
        _medfed(
            "server", "start", "--kit", str(kits / "coordinator"), "--host", "127.0.0.1",
            cwd=work, log=work / "superlink.log",
        )
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "SuperLink running" not in (work / "superlink.log").read_text():
            if time.monotonic() > deadline or procs[0].poll() is not None:
                sys.exit(f"SuperLink did not start; see {work / 'superlink.log'}")
            time.sleep(0.5)
        for site in SITES:
            procs.append(
                _medfed(
                    "site", "start", "--kit", str(kits / "sites" / site),
                    "--data", str(data / site), cwd=work, log=work / f"{site}.log",
                )
            )  # fmt: skip
        run = _medfed(
            "run", "federation=deploy", f"federation.kit={kits / 'coordinator'}", *config,
            "run_name=deploy", f"output_dir={work / 'deploy'}", cwd=work,
            log=work / "deploy.log",
        )  # fmt: skip
        if run.wait(timeout=3600) != 0:
            sys.exit(f"deployment run failed; see {work / 'deploy.log'}")
    finally:
        for proc in reversed(procs):
            _stop(proc)
    deployment = _round_seconds(work / "deploy" / "deploy" / "history.json")
    print(f"deployment rounds: {deployment}", file=sys.stderr)
    sim_median, dep_median = statistics.median(simulation), statistics.median(deployment)
    print(
        json.dumps(
            {
                "rounds": rounds,
                "sites": len(SITES),
                "simulation_round_s": round(sim_median, 2),
                "deployment_tls_round_s": round(dep_median, 2),
                "deployment_overhead_s": round(dep_median - sim_median, 2),
                "cpus": os.cpu_count(),
                "load_avg_1min": round(os.getloadavg()[0], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
