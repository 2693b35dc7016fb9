"""Run medfed's workload as an NVFlare FedAvg job (PyTorch recipe, Client API script).

Runs in the NVFlare venv with medfed's checkout on PYTHONPATH (`scripts/bench/nvflare_peer`
starts it). `--engine sim` runs NVFlare's simulator (`SimEnv`, one thread per site);
`--engine poc` its proof-of-concept deployment (`PocEnv`: server, clients and admin as
separate processes on this machine, mutual TLS). `--poll S` sets the client's task
fetch interval and the server's task check period (NVFlare's defaults: 0.5 s each).
Prints the server's log path on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe

CLIENT = Path(__file__).resolve().parent / "client.py"


class PolledFedAvg(FedAvgRecipe):
    """FedAvg whose server checks its tasks every `period` seconds."""

    def __init__(self, *, period: float, **kwargs: object) -> None:
        self._period = period
        super().__init__(**kwargs)  # type: ignore[arg-type]

    def _get_controller_kwargs(self) -> dict[str, object]:
        return {"task_check_period": self._period}


def unet(cfg: Any) -> dict[str, Any]:
    """medfed's U-Net (`federation.models`) as NVFlare's model config for its server."""
    return {
        "class_path": "monai.networks.nets.unet.UNet",
        "args": {
            "spatial_dims": cfg.spatial_dims,
            "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels,
            "channels": list(cfg.channels),
            "strides": list(cfg.strides),
            "num_res_units": cfg.num_res_units,
            "norm": [cfg.norm, {"affine": cfg.norm_affine}],
            "act": ["relu", {"inplace": False}],
            "dropout": cfg.dropout,
        },
    }


class StatusProbe:
    """Asks NVFlare's admin session for the POC job's status, one call at a time.

    Its admin session can hang for good once the server stops answering; a call still out
    is waited on again instead of piling a new one on top of it.
    """

    def __init__(self, run: Any) -> None:
        self._run = run
        self._asking: threading.Thread | None = None
        self._status: str | None = None

    def _ask(self) -> None:
        self._status = self._run.get_status()

    def answered(self, seconds: float) -> bool:
        """Whether a status call returned a status within `seconds`."""
        if self._asking is None or not self._asking.is_alive():
            self._status = None
            self._asking = threading.Thread(target=self._ask, daemon=True)
            self._asking.start()
        self._asking.join(seconds)
        return not self._asking.is_alive() and bool(self._status)


def server_log_written(workspace: Path) -> float:
    """When the POC server last wrote a log (epoch seconds; 0 before it wrote one)."""
    logs = (p for p in workspace.rglob("log.txt") if "server" in p.parts)
    return max((p.stat().st_mtime for p in logs), default=0.0)


def stored_job(workspace: Path) -> Path | None:
    """The ended POC job's workspace archive, once NVFlare's job store holds all of it."""
    for meta in workspace.glob("jobs-storage/*/meta"):
        try:
            status = str(json.loads(meta.read_text()).get("status", ""))
        except (OSError, ValueError):
            continue
        archive = meta.with_name("workspace")
        if status.startswith("FINISHED") and zipfile.is_zipfile(archive):
            return archive
    return None


def wait_for_end(workspace: Path, run: Any, *, patience: float, limit: float) -> Path:
    """Wait until the POC job ended (its stored workspace); give up when it shows no life.

    Under load (30 sites on 2 cores) NVFlare's admin session can wedge for good while the
    job goes on and ends, and `get_result` stops the job on the first missed call: the
    end is read from the server's job store instead, and an answered status call or the
    server's log growing count as signs of life. Giving up exits at once (NVFlare's own
    threads may never end); `run_nvflare` then stops the job's processes.
    """
    started = answered = time.monotonic()
    written = server_log_written(workspace)
    probe = StatusProbe(run)
    while (archive := stored_job(workspace)) is None:
        alive = probe.answered(5)
        now = time.monotonic()
        last, written = written, server_log_written(workspace)
        answered = now if alive or written > last else answered
        if now - answered > patience or now - started > limit:
            quiet = now - answered
            why = f"no sign of life for {quiet:.0f} s" if quiet > patience else "no end"
            print(f"NVFlare's POC job given up after {now - started:.0f} s: {why}", file=sys.stderr)
            sys.stderr.flush()
            os._exit(3)
        time.sleep(5)
    return archive


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", required=True)
    parser.add_argument("--engine", choices=("sim", "poc"), required=True)
    parser.add_argument("--sites", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--poll", type=float, default=None)
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--patience", type=float, default=300.0, help="s with no sign of life")
    parser.add_argument("--limit", type=float, default=3600.0, help="s for the whole POC job")
    args = parser.parse_args()
    workload = Path(args.workload)
    spec = torch.load(workload / "spec.pt", weights_only=False)
    common = {
        "name": f"medfed-{args.engine}-{args.sites}",
        "model": unet(spec["model"]),
        "initial_ckpt": str(workload / "initial.pt"),  # medfed's seeded initial weights
        "min_clients": args.sites,
        "num_rounds": args.rounds,
        "train_script": str(CLIENT),
        "train_args": f"--workload {args.workload}",
        "key_metric": "train_seconds",
        # Never met: it makes the server log "Round N global metrics" once it aggregated.
        "stop_cond": "train_seconds < 0",
    }
    if args.poll is None:
        recipe: FedAvgRecipe = FedAvgRecipe(**common)  # type: ignore[arg-type]
    else:
        recipe = PolledFedAvg(period=args.poll, **common)
        recipe.add_client_config({"default_task_fetch_interval": args.poll})
    clients = [f"site-{i + 1}" for i in range(args.sites)]
    workspace = Path(args.workspace)
    if args.engine == "sim":
        from nvflare.recipe.sim_env import SimEnv

        env = SimEnv(clients=clients, num_threads=args.sites, workspace_root=str(workspace))
        recipe.execute(env)
    else:
        from nvflare.recipe.poc_env import PocEnv

        os.environ["NVFLARE_POC_WORKSPACE"] = str(workspace)  # read by PocEnv
        run = recipe.execute(PocEnv(num_clients=args.sites, clients=clients))
        if run is None:
            raise SystemExit("NVFlare did not start the POC job")
        archive = wait_for_end(workspace, run, patience=args.patience, limit=args.limit)
        with zipfile.ZipFile(archive) as stored:
            (workspace / "server-job-log.txt").write_bytes(stored.read("log.txt"))
        print(workspace / "server-job-log.txt")  # the server's job log, rounds' banners in it
        sys.stdout.flush()
        os._exit(0)  # NVFlare's admin threads may never end
    # The server's job log: the one with the rounds' banners.
    print(next(p for p in workspace.rglob("log.txt") if "Round 0 started." in p.read_text()))


if __name__ == "__main__":
    main()
