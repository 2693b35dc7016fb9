"""How the benchmarks start runs: `medfed run`, deployment clusters, plain Flower."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _profile import ProcessProfile
    from plain_flower import PlainSettings

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


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
        "medfed.cli",
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


def bench_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the processes a benchmark starts: this checkout, this Python's tools."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    return {**env, **(extra or {})}


def start(
    command: list[str], *, cwd: Path, log: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start `command` in its own process group, output to `log`."""
    out = log.open("wb") if log else None
    try:
        return subprocess.Popen(
            command,
            cwd=cwd,
            env=bench_env(env),
            stdout=out or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        if out:
            out.close()  # the child has its own copy


def medfed(
    *args: str, cwd: Path, log: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start `medfed ARGS` from this checkout."""
    return start([sys.executable, "-m", "medfed.cli", *args], cwd=cwd, log=log, env=env)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process started by `start` and its whole group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=20)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def kits_of(base: Path) -> Path:
    """Where `provision(base, ...)` writes the kits."""
    return base / "kits"


def site_kit(base: Path, site: str) -> Path:
    """The kit that `site` made for itself in `provision(base, ...)`."""
    return base / "site-kits" / site


def provision(base: Path, sites: list[str]) -> Path:
    """Provision `sites` on a free loopback port (each makes its own keys); the kits' folder."""
    from federation.ports import free_port
    from federation.provision import provision_local

    base.mkdir(parents=True, exist_ok=True)
    (base / "consortium.yaml").write_text(
        json.dumps(
            {
                "name": "bench",
                "coordinator": {"address": f"127.0.0.1:{free_port()}"},
                "budget": {"max_epsilon": 100.0, "delta": 1e-5},
                "sites": sites,
            }
        )
    )
    kits = kits_of(base)
    provision_local(base / "consortium.yaml", kits, base / "site-kits")
    return kits


def medfed_deployment(
    name: str,
    *,
    base: Path,
    data: Path,
    sites: list[str],
    config: list[str],
    warm: bool = True,
    profile: ProcessProfile | None = None,
) -> Path:
    """A medfed deployment run over TLS on loopback, through the product's commands.

    `medfed provision`, `medfed server start`, one `medfed site start` per site on
    `data/SITE`, `medfed run federation=deploy CONFIG`; everything stops at the end.
    With `profile`, every process started is sampled until the run ends.

    Returns:
        The run's history.json. The kits stay in `kits_of(base / name)`.
    """
    from client.supernode import WARM_ENV

    base = base / name
    kits = provision(base, sites)
    procs = [
        medfed(
            "server", "start", "--kit", str(kits / "coordinator"), "--host", "127.0.0.1",
            cwd=base, log=base / "superlink.log",
        )
    ]  # fmt: skip
    if profile is not None:
        profile.add(procs[0].pid)
        profile.start()
    try:
        deadline = time.monotonic() + 120
        while "SuperLink running" not in (base / "superlink.log").read_text():
            if time.monotonic() > deadline or procs[0].poll() is not None:
                raise RuntimeError(f"SuperLink did not start; see {base / 'superlink.log'}")
            time.sleep(0.5)
        for site in sites:
            procs.append(
                medfed(
                    "site", "start", "--kit", str(site_kit(base, site)),
                    "--data", str(data / site), cwd=base, log=base / f"{site}.log",
                    env={WARM_ENV: "1" if warm else "0"},
                )
            )  # fmt: skip
            if profile is not None:
                profile.add(procs[-1].pid)
        run = medfed(
            "run", "federation=deploy", f"federation.kit={kits / 'coordinator'}", *config,
            f"run_name={name}", f"output_dir={base / 'out'}", cwd=base, log=base / "run.log",
        )  # fmt: skip
        if profile is not None:
            profile.add(run.pid)
        if run.wait(timeout=3600) != 0:
            # Its folder may be a temporary one, gone by the time anyone reads this.
            tail = (base / "run.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"deployment run {name} failed; the end of its run.log:\n{tail}")
    finally:
        if profile is not None:
            profile.stop()
        for proc in reversed(procs):
            stop(proc)
    return base / "out" / name / "history.json"


def plain_deployment(
    name: str, *, base: Path, coordinator: Path, settings: PlainSettings, timeout: float = 3600
) -> list[dict[str, float]]:
    """The plain Flower app (`plain_flower`) on stock Flower over TLS on loopback.

    `flower-superlink` with the coordinator kit's certificate, one `flower-supernode` per
    site (Flower's defaults otherwise: no node authentication, a new ClientApp process per
    message), `flwr run`, its log followed until the run ends, as `medfed run` does.

    Args:
        name: Folder of this cluster under `base`.
        base: Work folder.
        coordinator: A coordinator kit whose CA, certificate and key serve TLS.
        settings: The app's `PlainSettings`.
        timeout: Seconds the run may take.

    Returns:
        The ServerApp's rounds: training-phase and slowest site's seconds.
    """
    from plain_flower import SETTINGS_ENV, write_app

    from client.supernode import free_port
    from federation.provision import CoordinatorKit
    from server.deploy import FlowerCli, wait_tls

    kit = CoordinatorKit(coordinator)
    base = base / name
    app = write_app(base / "app")
    settings.save(base / "settings.json")
    env = {SETTINGS_ENV: str(base / "settings.json")}
    address = f"127.0.0.1:{free_port()}"
    link = [
        str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(kit.ca), "--ssl-certfile",
        str(kit.cert), "--ssl-keyfile", str(kit.key), "--disable-runtime-dependency-installation",
        "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
    ]  # fmt: skip
    link_env = {**env, "FLWR_HOME": str(base / "link")}
    procs = [start(link, cwd=base, log=base / "superlink.log", env=link_env)]
    cli = FlowerCli(kit, address=address)  # the kit's CA, pointed at this SuperLink
    try:
        wait_tls(address, kit.ca, procs[0], 60)
        for i in range(settings.sites):
            node = [
                str(BIN / "flower-supernode"), "--superlink", address, "--root-certificates",
                str(kit.ca), "--node-config", f"partition-id={i} num-partitions={settings.sites}",
                "--port", str(free_port()),
            ]  # fmt: skip
            node_env = {**env, "FLWR_HOME": str(base / f"node-{i}")}
            procs.append(start(node, cwd=base, log=base / f"node-{i}.log", env=node_env))
        run_id = int(cli.call("run", str(app))["run-id"])
        deadline = time.monotonic() + timeout
        follower = cli.follow_log(run_id, lambda _line: None)
        while True:  # the stream ends with the run; if it broke off, look now and then
            follower.wait(max(1.0, deadline - time.monotonic()))
            status = str(cli.run_info(run_id)["status"])
            if status.startswith("finished:") or time.monotonic() > deadline:
                break
            time.sleep(5.0)
        (base / "run.log").write_text(follower.text() or cli.log_text(run_id))
        if status != "finished:completed":
            raise RuntimeError(f"plain Flower run ended as {status!r}; see {base / 'run.log'}")
    finally:
        for proc in reversed(procs):
            stop(proc)
    records: list[dict[str, float]] = json.loads(Path(settings.out).read_text())
    return records
