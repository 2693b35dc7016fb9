"""Real deployment on loopback: a provisioned consortium, a SuperLink, SuperNodes.

Every process is started in its own session through the `medfed` CLI; teardown stops
each by PID (and the processes it started, found through /proc), even on failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from client.supernode import free_port
from federation.provision import provision_local
from tests.conftest import SITES

ROOT = Path(__file__).resolve().parents[2]


def _children(pid: int) -> list[int]:
    """All descendants of `pid` (from /proc), deepest last."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc: subprocess.Popen[bytes], *, sig: int = signal.SIGTERM, grace: float = 5):
    """Stop a process and its descendants, by PID."""
    tree = [proc.pid, *_children(proc.pid)]
    for pid in tree:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    for pid in [*tree, *_children(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass


def medfed_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    return env


@dataclass
class Proc:
    """A process started for a test, with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, needle: str, timeout: float, *, exited_ok: bool = False) -> str:
        """Wait until the log holds `needle`; fails with the log attached."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            if needle in text:
                return text
            if self.popen.poll() is not None and not exited_ok:
                break
            time.sleep(0.3)
        raise AssertionError(
            f"{self.name}: {needle!r} not seen (exit {self.popen.poll()}); log:\n"
            f"{self.text()[-5000:]}"
        )


@dataclass
class Cluster:
    """A provisioned consortium on loopback and the processes started for it."""

    root: Path
    data: Path
    port: int
    procs: list[Proc] = field(default_factory=list)

    @property
    def description(self) -> Path:
        return self.root / "consortium.yaml"

    @property
    def kits(self) -> Path:
        return self.root / "kits"

    @property
    def coordinator(self) -> Path:
        return self.kits / "coordinator"

    def site_kit(self, name: str) -> Path:
        """The kit the site made itself (`medfed site init`), joined to the consortium."""
        return self.root / "site-kits" / name

    def spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        log = self.root / "logs" / f"{name}-{len(self.procs)}.log"
        log.parent.mkdir(exist_ok=True)
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "medfed.cli", *args],
                cwd=self.root,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=medfed_env() | (env or {}),
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def start_superlink(self) -> Proc:
        proc = self.spawn(
            "superlink", "server", "start", "--kit", str(self.coordinator), "--host", "127.0.0.1"
        )
        proc.wait_for("SuperLink running", 90)
        return proc

    def start_site(
        self, name: str, *extra: str, kit: Path | None = None, env: dict[str, str] | None = None
    ) -> Proc:
        return self.spawn(
            name,
            "site",
            "start",
            "--kit",
            str(kit or self.site_kit(name)),
            "--data",
            str(self.data / name),
            *extra,
            env=env,
        )

    def flwr(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = medfed_env()
        env["FLWR_HOME"] = str(self.coordinator / "flwr-home")
        return subprocess.run(
            ["flwr", *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )

    def online(self) -> int:
        from federation.provision import CoordinatorKit
        from server.deploy import FlowerCli

        cli = FlowerCli(CoordinatorKit(self.coordinator))  # the SuperLink's loopback address
        return sum(1 for n in cli.nodes() if n.get("status") == "online")

    def wait_online(self, count: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while self.online() < count:
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.text()[-2000:]}" for p in self.procs)
                raise AssertionError(f"fewer than {count} sites online:\n{logs}")
            time.sleep(0.5)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.popen.poll() is None or _children(proc.popen.pid):
                kill_tree(proc.popen)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ({p.log})\n{p.text()[-3000:]}" for p in self.procs)


def make_consortium(root: Path, data: Path, sites: list[str], *, name: str = "loopback") -> Cluster:
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(root, data, port)
    cluster.description.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "coordinator": {"address": f"127.0.0.1:{port}", "san": ["localhost"]},
                "budget": {"max_epsilon": 100.0, "delta": 1e-5},
                "sites": sites,
            }
        )
    )
    provision_local(cluster.description, cluster.kits, root / "site-kits")
    return cluster


@contextlib.contextmanager
def teardown_on_sigterm() -> Iterator[None]:
    """A SIGTERM (e.g. from `timeout`) still runs the fixtures' teardown."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, consortium) -> Iterator[Cluster]:
    """SuperLink (TLS, node auth) and three SuperNodes, shared by a test module."""
    data, _ = consortium
    made = make_consortium(tmp_path_factory.mktemp("deploy"), data, list(SITES))
    with teardown_on_sigterm(), contextlib.ExitStack() as stack:
        stack.callback(made.stop_all)
        made.start_superlink()
        for site in SITES:
            made.start_site(site)
        made.wait_online(len(SITES))
        yield made


RunMedfed = Callable[..., subprocess.Popen[bytes]]
