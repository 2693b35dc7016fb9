"""Where a deployment's time goes: CPU seconds, processes and memory of each role.

`ProcessProfile` samples every process under the cluster's process groups a few times a
second, classifies it by what it runs (SuperLink, gate, ServerApp, and per site its
agent, SuperNode, SuperExec, fork server and ClientApps), and keeps each role's CPU
seconds (a process's own and those of the children it reaped, so a ClientApp that lived
between two samples is still counted), its process count and its memory (PSS, so pages
a fork shares with its parent count once).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psutil

__all__ = ["SITE_ROLES", "ProcessProfile", "gate_requests", "role_of"]

_ROLES = (
    ("multiprocessing.forkserver", "forkserver"),
    ("nginx", "gate"),
    ("flower-superlink", "superlink"),
    ("server.superlink", "superlink"),
    ("flwr-serverapp", "serverapp"),
    ("--plugin-type serverapp", "serverapp"),
    ("flower-superexec --plugin-type serverapp", "serverapp"),
    ("client.superexec", "superexec"),
    ("flower-superexec", "superexec"),
    ("client.supernode", "supernode"),
    ("flower-supernode", "supernode"),
    ("flwr-clientapp", "clientapp"),
    ("medfed.cli site start", "site agent"),
    ("medfed.cli server start", "server agent"),
    ("medfed.cli run", "run"),
)
# Roles each site runs (the rest are the coordinator's).
SITE_ROLES = ("site agent", "supernode", "superexec", "forkserver", "clientapp")


def role_of(proc: psutil.Process, forkservers: set[int]) -> str:
    """The role of `proc` from its command line (a fork of a fork server: a ClientApp)."""
    if proc.ppid() in forkservers:
        return "clientapp"
    line = " ".join(proc.cmdline())
    for marker, role in _ROLES:
        if marker in line:
            return role
    return "other"


@dataclass
class _Sample:
    at: float
    cpu: dict[str, float]
    count: dict[str, int]
    pss_mb: dict[str, float]


@dataclass
class ProcessProfile:
    """Samples the processes under `roots` (pids of process-group leaders) until stopped."""

    roots: list[int]
    interval: float = 0.25
    samples: list[_Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> ProcessProfile:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def add(self, pid: int) -> None:
        self.roots.append(pid)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        tick = 0
        while not self._stop.is_set():
            self.samples.append(self._sample(memory=tick % 8 == 0))
            tick += 1
            self._stop.wait(self.interval)

    def _sample(self, *, memory: bool) -> _Sample:
        procs: list[psutil.Process] = []
        for pid in list(self.roots):
            try:
                root = psutil.Process(pid)
                procs += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        cpu: dict[str, float] = defaultdict(float)
        count: dict[str, int] = defaultdict(int)
        pss: dict[str, float] = defaultdict(float)
        forkservers: set[int] = set()
        for proc in procs:
            try:
                if "multiprocessing.forkserver" in " ".join(proc.cmdline()):
                    forkservers.add(proc.pid)
            except psutil.Error:
                continue
        for proc in procs:
            try:
                role = role_of(proc, forkservers)
                times = proc.cpu_times()
                cpu[role] += times.user + times.system + times.children_user
                cpu[role] += times.children_system
                count[role] += 1
                if memory:
                    pss[role] += proc.memory_full_info().pss / 2**20
            except psutil.Error:
                continue
        return _Sample(time.time(), dict(cpu), dict(count), dict(pss) if memory else {})

    def cpu_between(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds each role used from `start` to `end` (epoch seconds)."""
        first, last = self._at(start), self._at(end)
        roles = set(first.cpu) | set(last.cpu)
        # A reaped process's time moves to its parent: a role's total only grows.
        return {r: max(0.0, last.cpu.get(r, 0.0) - first.cpu.get(r, 0.0)) for r in roles}

    def _at(self, when: float) -> _Sample:
        times = [s.at for s in self.samples]
        return self.samples[min(len(times) - 1, bisect.bisect_left(times, when))]

    def processes(self) -> dict[str, int]:
        """Most processes of each role seen at once."""
        return {role: int(n) for role, n in self._peaks("count").items()}

    def pss_mb(self) -> dict[str, float]:
        """Peak memory (PSS, MiB) of each role."""
        return self._peaks("pss_mb")

    def _peaks(self, measure: str) -> dict[str, float]:
        """The largest value of `measure` (a `_Sample` field) each role reached."""
        out: dict[str, float] = defaultdict(float)
        for sample in self.samples:
            for role, value in getattr(sample, measure).items():
                out[role] = max(out[role], value)
        return dict(out)


def gate_requests(log: Path, start: float, end: float) -> dict[str, dict[str, float]]:
    """Fleet requests the sites made from `start` to `end` (epoch s), from the gate's log.

    Returns:
        Per API path: how many, and their mean time in the gate (the SuperLink's answer
        included), in seconds.
    """
    count: dict[str, int] = defaultdict(int)
    total: dict[str, float] = defaultdict(float)
    for line in log.read_text().splitlines():
        stamp = line.split(" ", 1)[0]
        try:
            at = datetime.fromisoformat(stamp).timestamp()
        except ValueError:
            continue
        if not start <= at <= end:
            continue
        path = line.split('"')[1].split()[1].rsplit("/", 1)[-1]
        count[path] += 1
        total[path] += float(line.rsplit(" ", 1)[-1])
    return {p: {"requests": count[p], "mean_seconds": total[p] / count[p]} for p in count}
