"""One `medfed run` in its own process, as the benchmarks start it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MiB."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def medfed_run(
    name: str, *, work: Path, data: Path, overrides: list[str], measure_memory: bool = False
) -> dict[str, Any]:
    """Run `medfed run` on `data` with fresh site state; its history, wall time and memory.

    Raises:
        RuntimeError: The run failed (the message ends with its error output).
    """
    args = [
        sys.executable,
        "-m",
        "federation.cli",
        "run",
        f"run_name={name}",
        f"data.root={data}",
        "data.generate=false",
        f"output_dir={work / 'outputs'}",
        f"federation.site_state_root={work / 'site-state' / name}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        "tracking.registered_model=",
        *overrides,
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss_mb(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    if measure_memory:
        sampler.start()
    _, err = proc.communicate()
    done.set()
    if measure_memory:
        sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"run {name} failed: {err.strip()[-2000:]}")
    history = json.loads((work / "outputs" / name / "history.json").read_text())
    history["wall_seconds"] = time.perf_counter() - started
    history["peak_rss_mb"] = peak if measure_memory else None
    return history


def final_dice(history: dict[str, Any]) -> float:
    """The last round's aggregated held-out Dice."""
    return float(history["rounds"][-1]["evaluate"].get("dice", float("nan")))
