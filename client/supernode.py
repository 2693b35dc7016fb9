"""The site agent in deployment: `medfed site start --kit DIR` runs Flower's SuperNode.

The SuperNode dials the coordinator's SuperLink (outbound only, TLS verified against the
consortium CA, authenticated with the site's key from its kit) and runs the medfed
ClientApp for each message, with a node config that names the site, its DICOM folder
and its state folder (policy, ledger signing key, ledger).

Run as `python -m client.supernode FLOWER-SUPERNODE-ARGS` it is `flower-supernode` with
three timings of Flower 1.41 changed (by `federation.flowerpatch`, as every change
medfed makes to Flower's internals): its fixed 3 s sleep between empty polls of the
SuperLink (up to 3 s added to every message a site receives) is capped at
`MEDFED_SUPERNODE_POLL_INTERVAL`, starting at 0.2 s after each reply (a run's next
message comes within a second or so); its 0.5 s sleeps while it waits on its own
ClientApp (local state, no network) are cut to 0.05 s; and its heartbeat interval (30 s;
the SuperLink declares a node gone after two missed beats, so a crashed site stalls a
round for about a minute) is `MEDFED_SUPERNODE_HEARTBEAT` (20 s: Flower beats every 12
s, and a crashed site is let go after 40 s; at its minimum, 10 s, each site sends a beat
every 4 s). Its SuperExec runs as a thread of the SuperNode (`client.superexec`), woken
as soon as a message came instead of asking over HTTP at an interval, and forks each
ClientApp from a warm process instead of starting a new Python that imports torch again
(`MEDFED_WARM_CLIENTAPPS=0` turns both off: Flower's own SuperExec process and a new
Python per message). Its runtime API, which the ClientApps and SuperExec ask, runs
Flower's middleware without Starlette's streaming between layers
(`flowerpatch.direct_runtime_middleware`); and it keeps an idle TLS connection to the
coordinator for `flowerpatch.FLEET_KEEPALIVE` instead of 5 s, so a heartbeat after a
pause needs no new handshake (`flowerpatch.fleet_connections_kept`).

Before the first task of any run is created, the run's app must pass the site's
`client.apptrust.AppGate` (its own medfed release or an app it approved); otherwise the
SuperNode answers with an error that names the app's digest, and nothing of it runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from client.apptrust import SITE_NAME_ENV, SITE_STATE_ENV, AppGate, UntrustedApp
from client.superexec import warm_clientapps
from federation import flowerpatch, keys
from federation.logs import context_logger
from federation.ports import free_port
from federation.provision import SiteKit

__all__ = [
    "EXIT_NOT_REGISTERED",
    "HEARTBEAT_ENV",
    "POLL_INTERVAL_ENV",
    "WARM_ENV",
    "SiteAgent",
    "free_port",
    "supernode_command",
    "supernode_env",
]

# `medfed site start` exits with this code when the SuperLink does not know the site's
# key (Flower logs its own code 305 and exits with 1).
EXIT_NOT_REGISTERED = 3
_FLOWER_NOT_REGISTERED = "Exit Code: 305"
POLL_INTERVAL_ENV = "MEDFED_SUPERNODE_POLL_INTERVAL"
HEARTBEAT_ENV = "MEDFED_SUPERNODE_HEARTBEAT"
_DEFAULT_POLL = 0.5
_DEFAULT_HEARTBEAT = 20.0
# The SuperExec asks the SuperNode for ClientApp tasks at this interval (s): seldom for
# medfed's own, a thread the SuperNode wakes as soon as a message came (each request
# costs both sides CPU, and a 30-site round lasts half a minute); Flower's own SuperExec
# process (cold ClientApps) is not woken, so it asks often.
_SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
_SUPEREXEC_POLL = {"warm": 5.0, "cold": 0.1}
# "0" turns warm ClientApps off (client.superexec): a new Python per message, as Flower does.
WARM_ENV = "MEDFED_WARM_CLIENTAPPS"


@dataclass(frozen=True)
class SiteAgent:
    """How one site's SuperNode is started."""

    kit: SiteKit
    data: Path
    state: Path
    superlink: str
    runtime_port: int
    poll_interval: float = _DEFAULT_POLL

    @classmethod
    def from_kit(
        cls,
        kit_dir: Path,
        *,
        data: Path,
        state: Path | None = None,
        superlink: str | None = None,
        runtime_port: int | None = None,
        poll_interval: float = _DEFAULT_POLL,
    ) -> SiteAgent:
        """Check the kit and the folders, and fill in the defaults.

        Raises:
            ValueError: The kit, the data folder or the state folder is unusable; the
                message says which and what to do.
        """
        kit = SiteKit(kit_dir.resolve())
        info = kit.info()
        for path, what in ((kit.ca, "CA certificate"), (kit.node_key, "SuperNode key")):
            if not path.is_file():
                raise ValueError(f"site kit {kit.root} has no {what} ({path.name})")
        if kit.node_key.stat().st_mode & 0o077:
            raise ValueError(
                f"{kit.node_key} is readable by group or others; run `chmod 600 {kit.node_key}`"
            )
        data = data.resolve()
        if not data.is_dir():
            raise ValueError(
                f"site {info['site']!r}: data folder {data} does not exist or is not a folder; "
                "pass the site's DICOM folder with --data (check it with `medfed site check`)"
            )
        state = (state or kit.state).resolve()
        if not (state / "policy.yaml").exists():
            context_logger(site=info["site"]).warning(
                "no privacy policy in %s: the site will refuse DP training until it has "
                "one (medfed site policy --state %s --max-epsilon E --delta D)",
                state,
                state,
            )
        if poll_interval <= 0:
            raise ValueError(f"poll interval {poll_interval} must be > 0 seconds")
        return cls(
            kit,
            data,
            state,
            superlink or str(info["superlink"]),
            runtime_port or free_port(),
            poll_interval,
        )

    @property
    def site(self) -> str:
        """The site's name."""
        return self.kit.name

    def node_config(self) -> str:
        """The `--node-config` string: site name, data path, state folder."""
        values = {
            keys.NODE_SITE_NAME: self.site,
            keys.NODE_DATA_PATH: str(self.data),
            keys.NODE_STATE_DIR: str(self.state),
        }
        for value in values.values():
            if '"' in value:
                raise ValueError(f"path {value!r} contains a double quote; rename the folder")
        return " ".join(f'{k}="{v}"' for k, v in values.items())


def supernode_command(agent: SiteAgent) -> list[str]:
    """The command line that starts the site's SuperNode (TLS and node authentication)."""
    return [
        sys.executable,
        "-m",
        "client.supernode",
        "--superlink",
        agent.superlink,
        "--root-certificates",
        str(agent.kit.ca),
        "--auth-supernode-private-key",
        str(agent.kit.node_key),
        "--node-config",
        agent.node_config(),
        "--host",
        "127.0.0.1",
        "--port",
        str(agent.runtime_port),
    ]


def supernode_env(agent: SiteAgent, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of the SuperNode: its own Flower home, short polls, this Python's tools."""
    env = dict(os.environ if base is None else base)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    env["FLWR_HOME"] = str(agent.kit.root / "flwr-home")
    env[POLL_INTERVAL_ENV] = str(agent.poll_interval)
    env[SITE_STATE_ENV] = str(agent.state)
    env[SITE_NAME_ENV] = agent.site
    env.setdefault(HEARTBEAT_ENV, str(_DEFAULT_HEARTBEAT))
    clientapps = "cold" if env.get(WARM_ENV, "1") == "0" else "warm"
    env.setdefault(_SUPEREXEC_POLL_ENV, str(_SUPEREXEC_POLL[clientapps]))
    # The code runs from the shipped Flower app; the site's medfed comes from this Python.
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def run_site(agent: SiteAgent) -> int:
    """Run the SuperNode in the foreground until it exits or is told to stop.

    SIGINT/SIGTERM stop the SuperNode and the ClientApps it started.

    Returns:
        The SuperNode's exit code (0 after a requested stop).
    """
    log = context_logger(site=agent.site)
    log.info(
        "starting SuperNode: SuperLink %s (TLS, CA %s), data %s, state %s",
        agent.superlink,
        agent.kit.ca,
        agent.data,
        agent.state,
    )
    proc = subprocess.Popen(
        supernode_command(agent),
        env=supernode_env(agent),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    stopping = False
    rejected = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}

    def pump() -> None:  # pass the SuperNode's log through, watching for refusals
        nonlocal rejected
        assert proc.stdout is not None
        for raw in proc.stdout:
            sys.stdout.buffer.write(raw)
            sys.stdout.buffer.flush()
            rejected = rejected or _FLOWER_NOT_REGISTERED.encode() in raw

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _reap_group(proc.pid)
        reader.join(timeout=5)
    if stopping:
        return 0
    if rejected:
        log.error(
            "the SuperLink rejected this site's key (%s): it is not registered or was "
            "revoked; ask the coordinator to register site-keys/%s.pub (medfed server start)",
            agent.kit.node_pub,
            agent.site,
        )
        return EXIT_NOT_REGISTERED
    if code:
        log.error("SuperNode exited with code %d", code)
    return code


def _reap_group(pgid: int, grace: float = 5.0) -> None:
    """Stop what is left of the SuperNode's process group (ClientApps, SuperExec)."""
    deadline = time.monotonic() + grace
    sig = signal.SIGTERM
    while time.monotonic() < deadline + grace:  # zombies may linger: give up eventually
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        time.sleep(0.2)


def _main(argv: list[str]) -> None:
    """`flower-supernode` with the site's app check, idle poll, heartbeat, warm ClientApps."""
    try:
        gate = AppGate.from_env()
    except UntrustedApp as err:
        sys.exit(f"medfed: {err}")
    log = context_logger(site=gate.site)
    trusted = gate.trusted()  # the release's digest is computed once, before any message
    log.info(
        "this site runs only these apps: %s",
        "; ".join(f"{d[:16]} ({why})" for d, why in trusted.items()) or "none",
    )
    try:
        flowerpatch.guard_new_runs(gate.admit, UntrustedApp, lambda err: log.error("%s", err))
        flowerpatch.short_supernode_polls(float(os.environ.get(POLL_INTERVAL_ENV, _DEFAULT_POLL)))
        if os.environ.get(WARM_ENV, "1") != "0":
            warm_clientapps(gate.state_dir)
        flowerpatch.heartbeat_interval(float(os.environ.get(HEARTBEAT_ENV, _DEFAULT_HEARTBEAT)))
        flowerpatch.direct_runtime_middleware()
        flowerpatch.fleet_connections_kept()
    except flowerpatch.FlowerVersionError as err:
        sys.exit(f"medfed: {err}")
    flowerpatch.run_supernode(argv)


if __name__ == "__main__":
    _main(sys.argv[1:])
