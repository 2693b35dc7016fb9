"""Where a deployment's time goes: CPU seconds, processes and memory of each role.

`ProcessProfile` samples every process under the cluster's process groups twice a
second, classifies it by what it runs (SuperLink, gate, ServerApp, and per site its
agent, SuperNode, SuperExec, fork server and ClientApps), and keeps each role's CPU
seconds (a process's own and those of the children it reaped, so a ClientApp that lived
between two samples is still counted), its process count and its memory (PSS, so pages
a fork shares with its parent count once). Sampling the 150 processes of a 30-site
deployment costs about 0.05 CPU-s per second, which it reports (`cost_per_second`).
"""

from __future__ import annotations

import bisect
import contextlib
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psutil

__all__ = ["SITE_ROLES", "ProcessProfile", "gate_requests", "role_of"]

_FORKSERVER = "multiprocessing.forkserver"
_TICKS = os.sysconf("SC_CLK_TCK")
# Memory (PSS: the kernel walks each process's pages) is read every this many samples.
_MEMORY_EVERY = 20
_ROLES = (
    (_FORKSERVER, "forkserver"),
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


def role_of(cmdline: str, parent_cmdline: str) -> str:
    """The role of a process from its command line (a fork of a fork server: a ClientApp)."""
    if _FORKSERVER in parent_cmdline:
        return "clientapp"
    for marker, role in _ROLES:
        if marker in cmdline:
            return role
    return "other"


def _proc_table() -> dict[int, tuple[int, int, float]]:
    """Every process: pid -> (parent pid, start time, CPU seconds with its reaped children).

    One read of each `/proc/PID/stat`: sampling ~150 processes through psutil (a scan of
    all processes per root, command lines each time) took half a core of this 2-core
    machine, more than some of the roles it measured.
    """
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # After "(comm)": state ppid ... utime stime cutime cstime (fields 14-17) ... starttime (22)
        fields = stat[stat.rfind(b")") + 2 :].split()
        cpu = sum(int(x) for x in fields[11:15]) / _TICKS
        table[int(name)] = (int(fields[1]), int(fields[19]), cpu)
    return table


def _cmdline(pid: int) -> str:
    """The command line of `pid` ("" once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


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
    interval: float = 0.5
    samples: list[_Sample] = field(default_factory=list)
    cost: float = 0.0  # CPU seconds the sampling itself took
    _roles: dict[tuple[int, int], str] = field(default_factory=dict)
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
            began = time.thread_time()
            self.samples.append(self._sample(memory=tick % _MEMORY_EVERY == 0))
            self.cost += time.thread_time() - began
            tick += 1
            self._stop.wait(self.interval)

    def _sample(self, *, memory: bool) -> _Sample:
        table = _proc_table()
        children: dict[int, list[int]] = defaultdict(list)
        for pid, (ppid, _, _) in table.items():
            children[ppid].append(pid)
        tree, todo = [], [pid for pid in self.roots if pid in table]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo += children.get(pid, [])
        cpu: dict[str, float] = defaultdict(float)
        count: dict[str, int] = defaultdict(int)
        pss: dict[str, float] = defaultdict(float)
        for pid in tree:
            ppid, started, seconds = table[pid]
            role = self._role(pid, started, ppid)
            cpu[role] += seconds
            count[role] += 1
            if memory:
                with contextlib.suppress(psutil.Error):
                    pss[role] += psutil.Process(pid).memory_full_info().pss / 2**20
        return _Sample(time.time(), dict(cpu), dict(count), dict(pss) if memory else {})

    def _role(self, pid: int, started: int, ppid: int) -> str:
        """`role_of` the process, its command lines read once per process."""
        key = (pid, started)
        if key not in self._roles:
            line, parent = _cmdline(pid), _cmdline(ppid)
            role = role_of(line, parent)
            if line != parent or role == "clientapp":  # else maybe forked, not yet exec'd
                self._roles[key] = role
            return role
        return self._roles[key]

    def cost_per_second(self) -> float:
        """CPU seconds the sampling took per second sampled (taken from the roles it measures)."""
        if len(self.samples) < 2:
            return 0.0
        return self.cost / (self.samples[-1].at - self.samples[0].at)

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
        Per API path: how many, how many of them opened a TLS connection, and their mean
        time in the gate (the SuperLink's answer included), in seconds.
    """
    count: dict[str, int] = defaultdict(int)
    opened: dict[str, int] = defaultdict(int)
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
        nth_on_connection, seconds = line.rsplit(" ", 2)[1:]
        count[path] += 1
        opened[path] += nth_on_connection == "1"
        total[path] += float(seconds)
    return {
        p: {"requests": count[p], "connections": opened[p], "mean_seconds": total[p] / count[p]}
        for p in count
    }
