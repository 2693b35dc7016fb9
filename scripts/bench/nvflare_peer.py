"""NVIDIA FLARE as a peer in the benchmarks: its own venv, medfed's workload, its timings.

`ensure_venv` makes the NVFlare venv when it is missing (`NVFLARE_VENV_ENV` names
it; default `.bench/nvflare-venv` in this checkout): NVFlare `NVFLARE_VERSION` with the
same torch and MONAI as medfed's venv, plus the few packages medfed's task code imports,
at medfed's versions. medfed's own venv is never touched.

`export_workload` writes each site's training tensors, prepared by medfed's own data
pipeline, with the task, model and privacy config; `run_nvflare` trains them with
NVFlare's PyTorch FedAvg recipe and a Client API script (`flare_peer/`) that calls
medfed's `task.train`, in NVFlare's simulator or its POC deployment (mutual TLS), and
returns each round's training phase (the server's "Round N started" to its aggregated
result, from its log) with the sites' own training spans.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from _runs import ROOT

__all__ = ["NVFLARE_VENV_ENV", "NVFLARE_VERSION", "ensure_venv", "export_workload", "run_nvflare"]

NVFLARE_VERSION = "2.9.0"
NVFLARE_VENV_ENV = "MEDFED_BENCH_NVFLARE_VENV"
# What medfed's task code imports besides torch and MONAI, at the versions medfed runs.
_SAME_AS_MEDFED = ("torch", "monai", "numpy", "omegaconf", "pydicom", "opacus")
_PEER = Path(__file__).resolve().parent / "flare_peer"
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_ROUND = re.compile(r"Round (\d+) (started|global metrics)")
# The longest a POC job may take (s) before the peer gives up on it (`flare_peer/job.py`).
_JOB_LIMIT = 3600


def venv_path() -> Path:
    """Where the NVFlare venv lives."""
    return Path(os.environ.get(NVFLARE_VENV_ENV) or ROOT / ".bench" / "nvflare-venv")


def ensure_venv() -> Path:
    """The NVFlare venv's Python, made first when missing (a few minutes, once).

    Raises:
        RuntimeError: pip failed; the message ends with its output.
    """
    venv = venv_path()
    python = venv / "bin" / "python"
    stamp = venv / f".nvflare-{NVFLARE_VERSION}"
    if stamp.exists():
        return python
    pins = [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in _SAME_AS_MEDFED]
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
        [str(python), "-m", "pip", "install", "--quiet", pins[0]],  # this machine's torch first
        [str(python), "-m", "pip", "install", "--quiet", f"nvflare=={NVFLARE_VERSION}", *pins[1:]],
    ]
    print(f"installing NVFlare {NVFLARE_VERSION} into {venv} ...", file=sys.stderr, flush=True)
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(step)} failed: {(done.stdout + done.stderr)[-2000:]}")
    stamp.touch()
    return python


def export_workload(
    folder: Path, *, data: Path, state: Path, sites: list[str], overrides: list[str], threads: int
) -> Path:
    """Each site's prepared training tensors and the run's config sections, in `folder`."""
    import torch

    from client.site import SiteIdentity, load_site_dataset
    from federation.compose import compose_config
    from federation.models import build_model
    from federation.tasks import get_task

    cfg = compose_config(overrides)
    task = get_task(cfg.task.name)
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "task": cfg.task,
        "model": cfg.model,
        "privacy": cfg.privacy,
        "seed": cfg.seed,
        "threads": threads,
    }
    torch.save(spec, folder / "spec.pt")
    torch.save(build_model(cfg.model, seed=cfg.seed).state_dict(), folder / "initial.pt")
    for site in sites:
        identity = SiteIdentity(site, data / site, state / site)
        prepared = load_site_dataset(identity, task, cfg.task, seed=cfg.seed)
        torch.save(prepared.data, folder / f"{site}.pt")
    return folder


def _stop_leftovers(work: Path) -> None:
    """Kill processes still running from `work` (a POC job's server and clients)."""
    mine = str(work)
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) == os.getpid():
            continue
        try:
            if mine in (proc / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:  # gone meanwhile, or not ours to read
            continue


def _log_times(log: Path) -> dict[int, dict[str, float]]:
    """Each round's start and end (aggregated) from the NVFlare server's log, epoch seconds."""
    rounds: dict[int, dict[str, float]] = {}
    stamp = 0.0  # a banner line ("Round N started.") has the time of the line before
    for line in log.read_text().splitlines():
        if when := _STAMP.match(line):
            stamp = datetime.strptime(when[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if match := _ROUND.search(line):
            key = "start" if match[2] == "started" else "end"
            rounds.setdefault(int(match[1]), {}).setdefault(key, stamp)
    return rounds


def run_nvflare(
    workload: Path, *, engine: str, sites: int, rounds: int, work: Path, poll: float | None
) -> list[dict[str, float]]:
    """Train the exported workload on NVFlare; each round's phase, slowest site and span.

    Args:
        workload: From `export_workload`.
        engine: "simulation" (`SimEnv`) or "deployment" (`PocEnv`).
        sites: Number of sites (site-1 ... site-N, as exported).
        rounds: FedAvg rounds.
        work: A fresh folder for NVFlare's workspace.
        poll: Client task fetch interval and server task check period (s); None for
            NVFlare's defaults.

    Raises:
        RuntimeError: The job failed; the message names its output.
    """
    python = ensure_venv()
    timing = workload / "timing"
    shutil.rmtree(timing, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    command = [
        str(python), str(_PEER / "job.py"), "--workload", str(workload), "--engine",
        "sim" if engine == "simulation" else "poc", "--sites", str(sites), "--rounds",
        str(rounds), "--workspace", str(work / "workspace"),
        "--limit", str(_JOB_LIMIT), *(["--poll", str(poll)] if poll is not None else []),
    ]  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)  # medfed's task code; nothing from medfed's venv
    env["PATH"] = os.pathsep.join([str(python.parent), env.get("PATH", "")])  # POC's python3
    env.pop("VIRTUAL_ENV", None)
    started = time.perf_counter()
    with (work / "nvflare.log").open("w") as errors:
        try:
            done = subprocess.run(
                command, env=env, stdout=subprocess.PIPE, stderr=errors, text=True,
                timeout=_JOB_LIMIT + 900,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            done = None
        finally:
            _stop_leftovers(work)  # what a failed POC job left running
    if done is None or done.returncode != 0 or not done.stdout.strip():
        tail = (work / "nvflare.log").read_text().strip().splitlines()[-1:]
        raise RuntimeError(f"NVFlare {engine} run failed ({' '.join(tail)}); see {work}")
    log = Path(done.stdout.strip().splitlines()[-1])
    times = _log_times(log)
    spans: dict[int, list[dict[str, Any]]] = {}
    for path in timing.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            spans.setdefault(int(record["round"]), []).append(record)
    out = []
    for number in sorted(times):
        marks, trained = times[number], spans.get(number, [])
        if "end" not in marks or len(trained) != sites:
            raise RuntimeError(
                f"NVFlare round {number} is incomplete in {log}: {len(trained)} of {sites} "
                f"sites' training recorded, round end {'logged' if 'end' in marks else 'missing'}"
            )
        out.append(
            {
                "phase": marks["end"] - marks["start"],
                "slowest": max(r["seconds"] for r in trained),
                "span": max(r["finished"] for r in trained) - min(r["started"] for r in trained),
            }
        )
    took = time.perf_counter() - started
    print(f"NVFlare {engine}, {sites} sites: {took:.0f} s", file=sys.stderr)
    return out
