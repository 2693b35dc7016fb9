"""The coordinator in deployment: SuperLink, Fleet gate, site registration and runs.

`medfed server start --kit DIR` runs `flower-superlink` (as `server.superlink`) with TLS
(the kit's certificate, signed by the consortium CA) and SuperNode authentication on
127.0.0.1 only, and the Fleet gate (`server.gate`) on the consortium address: the sites
reach the Fleet API and nothing else. It registers the public keys of the kit's enrolled
sites (revoked ones are unregistered) and records which node id each site's key was
given (`CoordinatorKit`'s node registry), which is how the ServerApp names replies.
`medfed run federation=deploy federation.kit=DIR` submits the medfed Flower app with the
resolved Hydra config as its run config, follows it, and fails loudly when the ServerApp
failed.

The `flwr` CLI talks to the SuperLink's loopback address through a connection in the
Flower config file of the kit's own Flower home (`flwr-home/config.toml`), written here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federation.appdigest import source_files
from federation.compose import check_config
from federation.config import MedfedConfig, anchor_paths, config_to_json, resolve_path
from federation.errors import FederationError
from federation.keys import RUN_CONFIG_JSON
from federation.logs import context_logger
from federation.ports import free_port
from federation.provision import CoordinatorKit
from server.gate import FleetGate

__all__ = [
    "FlowerCli",
    "LogFollower",
    "RunOutcome",
    "SuperLink",
    "control_address",
    "deployment_config",
    "node_presence",
    "registered_nodes",
    "run_deployment",
    "superlink_command",
    "sync_registrations",
    "sync_running",
    "wait_tls",
]

_SUPERLINK_HOME = "superlink-home"
_CLI_HOME = "flwr-home"
_NODES = "nodes.json"
_LINK = "link.json"  # the running SuperLink: its loopback address, database, node registry
# Flower's name for its in-memory state (`flwr.supercore.constant.FLWR_IN_MEMORY_DB_NAME`).
_IN_MEMORY = ":flwr-in-memory:"
_DONE = "finished:"
# The coordinator's own line at the end of each round (server.loop).
_ROUND_LINE = "] [round "


def _flower_env(home: Path) -> dict[str, str]:
    """This environment for a Flower process: its Flower home, this Python's tools first."""
    env = dict(os.environ, FLWR_HOME=str(home))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _stage_app(folder: Path) -> Path:
    """A copy of the medfed Flower app's files in `folder`, for `flwr run` to bundle.

    Flower's builder walks and resolves every file under the folder it is given before
    it drops what `.gitignore` names: a checkout's virtual environment cost it ~8 s of
    CPU per run on a 2-core machine (past `flwr run`'s time limit with 30 sites
    starting). The copy holds the same files, so the app digest is the same.
    """
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise FederationError(
            f"no pyproject.toml beside the medfed code in {root}: launching a deployment "
            "run ships the Flower app, so run medfed from a source checkout"
        )
    for name, path in source_files(root).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / name)
    return folder


class FlowerCli:
    """The `flwr` CLI bound to a coordinator kit's SuperLink (its loopback address)."""

    def __init__(self, kit: CoordinatorKit, *, address: str | None = None) -> None:
        self.kit = kit
        manifest = kit.manifest()
        self.connection = str(manifest["name"])
        self.address = address or control_address(kit)
        self.home = kit.root / _CLI_HOME
        self.home.mkdir(exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.connection}"\n\n'
            f"[superlink.{self.connection}]\n"
            f'address = "{self.address}"\n'
            f'root-certificates = "{kit.ca.resolve()}"\n'
        )

    def call(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        """Run `flwr ARGS CONNECTION --format json` and return its JSON answer.

        Raises:
            FederationError: The command failed; the message holds Flower's reason.
        """
        proc = subprocess.run(
            ["flwr", *args, self.connection, "--format", "json"],
            env=_flower_env(self.home),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        try:
            answer: dict[str, Any] = json.loads(proc.stdout[proc.stdout.find("{") :])
        except ValueError:
            answer = {"success": False, "error-message": (proc.stdout + proc.stderr)[-2000:]}
        if not answer.get("success"):
            raise FederationError(
                f"`flwr {' '.join(args[:2])}` failed: {answer.get('error-message', answer)}"
            )
        return answer

    def log_text(self, run_id: int, *, timeout: float = 60.0) -> str:
        """The run's log as the SuperLink kept it."""
        try:
            proc = subprocess.run(
                ["flwr", "log", str(run_id), self.connection, "--show"],
                env=_flower_env(self.home),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            return f"(flwr log timed out: {err})"
        return proc.stdout + proc.stderr

    def follow_log(self, run_id: int, on_line: Callable[[str], None]) -> LogFollower:
        """Stream the run's log (`flwr log RUN_ID --stream`); `on_line` gets each line.

        One process for the whole run, where polling the status would start one every few
        seconds on the coordinator's CPU.
        """
        proc = subprocess.Popen(
            ["flwr", "log", str(run_id), self.connection, "--stream"],
            env=_flower_env(self.home),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        return LogFollower(proc, on_line)

    def nodes(self) -> list[dict[str, Any]]:
        """The SuperNodes known to the SuperLink, with their status."""
        return list(self.call("supernode", "ls")["nodes"])

    def run_info(self, run_id: int) -> dict[str, Any]:
        """Status of one run (`flwr ls --run-id`)."""
        runs = self.call("ls", "--run-id", str(run_id))["runs"]
        return dict(runs[0])


def superlink_command(
    kit: CoordinatorKit, *, host: str, port: int, database: Path | None
) -> list[str]:
    """The SuperLink's command line: TLS, node authentication, no dependency installs.

    It runs `flower-superlink` as `server.superlink`, with lean Fleet middleware.
    `database` None keeps the SuperLink's state in memory (Flower's in-memory state).
    """
    return [
        sys.executable,
        "-m",
        "server.superlink",
        "--ssl-ca-certfile",
        str(kit.ca),
        "--ssl-certfile",
        str(kit.cert),
        "--ssl-keyfile",
        str(kit.key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str(database) if database is not None else _IN_MEMORY,
    ]


def wait_tls(address: str, ca: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait until the SuperLink `proc` accepts TLS connections on `address` (CA `ca`).

    Raises:
        FederationError: It exited, or did not accept them within `timeout` s.
    """
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise FederationError(f"flower-superlink exited with code {proc.returncode}")
        try:
            with (
                socket.create_connection((host.strip("[]"), int(port)), timeout=2) as raw,
                context.wrap_socket(raw, server_hostname=host.strip("[]")),
            ):
                return
        except OSError as err:
            if time.monotonic() > deadline:
                raise FederationError(
                    f"the SuperLink did not accept TLS connections on {address} within "
                    f"{timeout:.0f} s: {err}"
                ) from err
            time.sleep(0.3)


@dataclass
class SuperLink:
    """A running SuperLink (loopback) and its Fleet gate, started from a coordinator kit."""

    kit: CoordinatorKit
    process: subprocess.Popen[bytes]
    address: str  # the SuperLink's own, loopback address (Control API)
    database: Path | None  # None: in memory
    log_file: Path
    gate: FleetGate | None = None

    @classmethod
    def start(
        cls,
        kit_dir: Path,
        *,
        host: str = "0.0.0.0",
        port: int | None = None,
        control_port: int | None = None,
        database: Path | None = None,
        log_file: Path | None = None,
        timeout: float = 60.0,
    ) -> SuperLink:
        """Start the SuperLink on loopback, the Fleet gate on `host:port`, register sites.

        Args:
            kit_dir: The coordinator kit.
            host: Interface the gate listens on (all by default; sites dial in).
            port: The gate's port; the kit's coordinator address's port by default.
            control_port: The SuperLink's port on 127.0.0.1 (default: a free one).
            database: A file for the SuperLink's state (registered keys, runs). By
                default the state is in memory: Flower's SQLite state puts every
                request through SQLAlchemy, which a consortium of many sites pays on
                every poll. Nothing is lost that medfed needs: each start registers
                the enrolled sites' keys again, and runs are kept in MLflow and the
                run folders.
            log_file: Where the SuperLink's output goes (default: in the kit).
            timeout: Seconds to wait for it to accept TLS connections.

        Raises:
            FederationError: It did not start; the message holds its log's end.
        """
        kit = CoordinatorKit(kit_dir.resolve())
        port = port or int(str(kit.manifest()["superlink"]).rsplit(":", 1)[1])
        home = kit.root / _SUPERLINK_HOME
        home.mkdir(exist_ok=True)
        database = database.resolve() if database is not None else None
        log_file = (log_file or home / "superlink.log").resolve()
        local = f"127.0.0.1:{control_port or free_port()}"
        nodes = _nodes_file(home, database)
        if database is None:
            nodes.unlink(missing_ok=True)  # a new in-memory state has no registrations
        link = cls(kit, _launch(kit, local, database, log_file), local, database, log_file)
        try:
            wait_tls(local, kit.ca, link.process, timeout)
            info = {"control": local, "database": str(database or ""), "nodes": str(nodes)}
            (home / _LINK).write_text(json.dumps(info, indent=2))
            sync_registrations(kit, FlowerCli(kit, address=local), nodes)
            listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            link.gate = FleetGate.start(kit, listen=listen, upstream=local, home=home)
            public = f"127.0.0.1:{port}" if host in ("0.0.0.0", "::") else listen
            wait_tls(public, kit.ca, link.gate.process, timeout)
        except BaseException as err:
            link.stop()
            tail = log_file.read_text(errors="replace")[-3000:]
            raise FederationError(f"{err}\n--- superlink log ---\n{tail}") from err
        context_logger().info(
            "SuperLink on %s (loopback only: Control and runtime APIs); Fleet gate on %s:%d "
            "(TLS, SuperNode authentication); sites: %s",
            local,
            host,
            port,
            ", ".join(kit.active_sites()) or "none enrolled yet",
        )
        return link

    def stop(self, grace: float = 10.0) -> None:
        """Stop the gate, the SuperLink and everything it started (ServerApps, SuperExec)."""
        if self.gate is not None:
            self.gate.stop(grace)
        _stop_group(self.process, grace)


def _launch(
    kit: CoordinatorKit, address: str, database: Path | None, log_file: Path
) -> subprocess.Popen[bytes]:
    """Start `flower-superlink` on the loopback `address`, its output to `log_file`."""
    env = _flower_env(kit.root / _SUPERLINK_HOME)
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    host, port = address.rsplit(":", 1)
    with log_file.open("ab") as out:
        return subprocess.Popen(
            superlink_command(kit, host=host, port=int(port), database=database),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _stop_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    # Children left in the group after the leader exited.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _nodes_file(home: Path, database: Path | None) -> Path:
    """Which node id each site's key was given: beside the state file, or in `home`."""
    return database.with_name(database.name + "." + _NODES) if database else home / _NODES


def _registry(kit: CoordinatorKit) -> Path:
    """The running SuperLink's node registry (`_nodes_file`)."""
    return Path(_link_info(kit)["nodes"])


def _link_info(kit: CoordinatorKit) -> dict[str, str]:
    path = kit.root / _SUPERLINK_HOME / _LINK
    if not path.exists():
        raise FederationError(
            f"no SuperLink was started from {kit.root}: start it on this machine with "
            f"`medfed server start --kit {kit.root}` (runs are launched from the coordinator)"
        )
    info: dict[str, str] = json.loads(path.read_text())
    return info


def control_address(kit: CoordinatorKit) -> str:
    """The loopback address of the SuperLink that `medfed server start` runs from `kit`.

    Raises:
        FederationError: No SuperLink was started from this kit.
    """
    return _link_info(kit)["control"]


def _read_nodes(path: Path) -> dict[str, dict[str, Any]]:
    raw = json.loads(path.read_text()) if path.exists() else {}
    # Files written before keys were tracked hold node ids alone.
    return {s: v if isinstance(v, dict) else {"node_id": int(v)} for s, v in raw.items()}


def registered_nodes(kit: CoordinatorKit) -> dict[int, str]:
    """Site of each node id, from the keys the coordinator registered (not what nodes say).

    Raises:
        FederationError: No SuperLink was started from this kit.
    """
    nodes = _read_nodes(_registry(kit))
    active = set(kit.active_sites())
    return {int(v["node_id"]): site for site, v in nodes.items() if site in active}


def node_presence(kit: CoordinatorKit) -> dict[str, dict[str, Any]]:
    """Each registered site's node: id, online now, and when it was last active.

    From the SuperLink itself: its state file, read-only (a node is online until its
    last heartbeat's deadline), or, for an in-memory state, its Control API. Empty when
    no SuperLink was started from this kit.
    """
    try:
        info = _link_info(kit)
    except FederationError:
        return {}
    nodes = _read_nodes(Path(info["nodes"]))
    database = info["database"]
    seen = _presence_in_file(Path(database)) if database else _presence_online(kit)
    presence = {}
    for site, node in nodes.items():
        online, last_active = seen.get(int(node["node_id"]) % 2**64, (False, ""))
        presence[site] = {
            "node_id": int(node["node_id"]),
            "online": online,
            "last_active": last_active,
        }
    return presence


def _presence_in_file(database: Path) -> dict[int, tuple[bool, str]]:
    import sqlite3

    seen: dict[int, tuple[bool, str]] = {}
    if database.exists():
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            for node_id, until, active in db.execute(
                "SELECT node_id, online_until, last_activated_at FROM node"
            ):  # node ids stored as signed 64-bit
                seen[int(node_id) % 2**64] = (float(until or 0) > time.time(), str(active or ""))
    return seen


def _presence_online(kit: CoordinatorKit) -> dict[int, tuple[bool, str]]:
    try:
        listed = FlowerCli(kit).nodes()
    except FederationError:  # not running
        return {}
    return {
        int(n["node-id"]) % 2**64: (n.get("status") == "online", str(n.get("online-at") or ""))
        for n in listed
    }


def sync_registrations(
    kit: CoordinatorKit, cli: FlowerCli, path: Path
) -> dict[str, dict[str, Any]]:
    """Register the enrolled sites' keys, unregister revoked and replaced ones.

    The node id each key was given (and the key's fingerprint) is kept in `path`, the
    node registry: it names the replies of that node, and tells a later revocation
    which node to unregister.

    Returns:
        Node id and key fingerprint of each registered site.
    """
    log = context_logger()
    nodes = _read_nodes(path)
    for site, entry in kit.manifest()["sites"].items():
        known = nodes.get(site)
        # Re-keyed: the registered key is not the one enrolled now (older records lack it).
        replaced = known is not None and known.get("auth_key") not in (None, entry.get("auth_key"))
        if known is not None and (entry["status"] == "revoked" or replaced):
            cli.call("supernode", "unregister", str(known["node_id"]))
            nodes.pop(site)
            log.info("site %s unregistered (%s)", site, "revoked" if not replaced else "re-keyed")
        if entry["status"] == "active" and site not in nodes:
            try:
                answer = cli.call("supernode", "register", str(kit.site_key(site)), "--name", site)
            except FederationError as err:
                if "already in use" not in str(err):
                    raise
                raise FederationError(
                    f"site {site}'s key is registered with the SuperLink, but not in {path}: "
                    "the coordinator cannot tell which node it is. Restore that file, or "
                    "start the SuperLink with a new --database (or none: in memory)"
                ) from err
            nodes[site] = {"node_id": int(answer["node-id"]), "auth_key": entry.get("auth_key")}
            log.info("site %s registered as node %d", site, nodes[site]["node_id"])
        path.write_text(json.dumps(nodes, indent=2))
    return nodes


def sync_running(kit_dir: Path) -> bool:
    """Bring a running SuperLink's registrations in line with the kit (enrolled, revoked).

    Returns:
        False when no SuperLink from this kit is reachable (it syncs at its next start).
    """
    kit = CoordinatorKit(kit_dir.resolve())
    try:
        info = _link_info(kit)
    except FederationError:
        return False
    host, port = info["control"].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            pass
    except OSError:
        return False
    sync_registrations(kit, FlowerCli(kit), _registry(kit))
    return True


class LogFollower:
    """A streaming `flwr log` process and the thread that reads it; ends with the run."""

    def __init__(self, proc: subprocess.Popen[str], on_line: Callable[[str], None]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        stream = proc.stdout
        assert stream is not None

        def pump() -> None:
            for line in stream:
                self.lines.append(line)
                on_line(line)

        self._reader = threading.Thread(target=pump, name="flwr-log", daemon=True)
        self._reader.start()

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the stream to end; whether it ended."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def text(self, timeout: float = 30.0) -> str | None:
        """The whole log once the stream ended cleanly and was read; None otherwise."""
        if not self.wait(timeout):
            self.proc.kill()
            return None
        self._reader.join(timeout)
        complete = self.proc.returncode == 0 and not self._reader.is_alive()
        return "".join(self.lines) if complete and self.lines else None


@dataclass(frozen=True)
class RunOutcome:
    """A finished deployment run."""

    run_id: int
    status: str
    seconds: float
    log: str


def deployment_config(cfg: MedfedConfig) -> tuple[MedfedConfig, CoordinatorKit]:
    """The config as the ServerApp will read it: absolute paths, the kit's sites.

    Raises:
        ValueError: `federation.kit` is unset or not a coordinator kit.
    """
    if not cfg.federation.kit:
        raise ValueError(
            "federation.kit is unset: point it to the coordinator kit written by "
            "`medfed provision` (federation.kit=OUTPUT/coordinator)"
        )
    kit = CoordinatorKit(resolve_path(cfg.federation.kit))
    sites = kit.active_sites()
    fed = cfg.federation
    if not fed.site_names:
        fed = dataclasses.replace(fed, site_names=sites, num_sites=len(sites))
    fed = dataclasses.replace(fed, kit=str(kit.root))
    cfg = anchor_paths(dataclasses.replace(cfg, federation=fed))
    check_config(cfg)
    return cfg, kit


def _wait_sites(cli: FlowerCli, cfg: MedfedConfig, timeout: float) -> int:
    """Wait until every site is online (or `timeout`); returns how many are."""
    log = context_logger(run=cfg.run_name)
    want = cfg.federation.num_sites
    deadline = time.monotonic() + timeout
    while True:
        online = sum(1 for n in cli.nodes() if n.get("status") == "online")
        if online >= want or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    if online < cfg.federation.min_sites:
        raise FederationError(
            f"only {online} of {want} sites are connected to the SuperLink, fewer than "
            f"federation.min_sites={cfg.federation.min_sites}; start the sites "
            "(medfed site start --kit DIR) and launch again"
        )
    if online < want:
        log.warning("%d of %d sites connected; starting anyway (min_sites met)", online, want)
    return online


def run_deployment(
    cfg: MedfedConfig,
    *,
    wait_sites: float = 60.0,
    timeout: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> RunOutcome:
    """Submit the run to the kit's SuperLink and follow it to the end.

    Args:
        cfg: The run configuration (`federation.kit` set), as for simulation.
        wait_sites: Seconds to wait for all sites to be connected before launching.
        timeout: Seconds to wait for the run (default: enough for every round).
        progress: Called with a line at each change of the run's status and with the
            coordinator's line at the end of each round.

    Raises:
        FederationError: The run failed, was stopped or did not finish in time; the
            message holds the end of the run's log.
    """
    cfg, kit = deployment_config(cfg)
    cli = FlowerCli(kit)
    _wait_sites(cli, cfg, wait_sites)
    with tempfile.TemporaryDirectory() as tmp:
        run_config = Path(tmp) / "run-config.toml"
        run_config.write_text(f"{RUN_CONFIG_JSON} = {json.dumps(config_to_json(cfg))}\n")
        app = _stage_app(Path(tmp) / "app")
        answer = cli.call("run", str(app), "--run-config", str(run_config))
    run_id = int(answer["run-id"])
    say = progress or context_logger(run=cfg.run_name).info
    say(f"submitted run {run_id} to {cli.address} ({cli.connection})")
    limit = timeout or (cfg.rounds + 1) * 2 * cfg.federation.round_timeout + 300
    started = time.monotonic()

    def on_line(line: str) -> None:
        if _ROUND_LINE in line:  # the coordinator's progress, as it happens
            say(line.rstrip())

    follower = cli.follow_log(run_id, on_line)
    status = ""
    while True:
        # The stream ends with the run; if it broke off, look every few seconds.
        follower.wait(max(1.0, limit - (time.monotonic() - started)))
        info = cli.run_info(run_id)
        if info["status"] != status:
            status = info["status"]
            say(f"run {run_id}: {status}")
        if status.startswith(_DONE):
            break
        if time.monotonic() - started > limit:
            follower.proc.kill()
            cli.call("stop", str(run_id))
            raise FederationError(f"run {run_id} did not finish within {limit:.0f} s; stopped it")
        time.sleep(5.0)  # each look is a `flwr` process: keep the coordinator's CPU free
    text = follower.text() or cli.log_text(run_id)
    outcome = RunOutcome(run_id, status, time.monotonic() - started, text)
    if status != _DONE + "completed":
        raise FederationError(
            f"run {run_id} ended as {status!r} ({info.get('status-details')}); the end of "
            f"its log:\n{text[-6000:]}"
        )
    return outcome
