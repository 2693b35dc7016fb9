"""The site agent in deployment: `medfed site start --kit DIR` runs Flower's SuperNode.

The SuperNode dials the coordinator's SuperLink (outbound only, TLS verified against the
consortium CA, authenticated with the site's key from its kit) and runs the medfed
ClientApp for each message, with a node config that names the site, its DICOM folder
and its state folder (policy, ledger signing key, ledger).

Run as `python -m client.supernode FLOWER-SUPERNODE-ARGS` it is `flower-supernode` with
three timings of the installed Flower (1.41) changed: its fixed 3 s sleep between empty
polls of the SuperLink (up to 3 s added to every message a site receives) is capped at
`MEDFED_SUPERNODE_POLL_INTERVAL`, starting at 0.05 s after each reply (the next
message of a run is due soon); its 0.5 s sleeps while it waits on its own ClientApp
(local state, no network) are cut to 0.05 s; and its heartbeat interval (30 s; the SuperLink
declares a node gone after two missed beats, so a crashed site stalls a round for about
a minute) is `MEDFED_SUPERNODE_HEARTBEAT` (10 s, Flower's minimum). Its SuperExec is
`client.superexec`, which forks each ClientApp from a warm process instead of starting a
new Python that imports torch again (`MEDFED_WARM_CLIENTAPPS=0` turns this off).

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
from typing import Any

from client.apptrust import SITE_NAME_ENV, SITE_STATE_ENV, AppGate, UntrustedApp
from federation import keys
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
_DEFAULT_HEARTBEAT = 10.0
# SuperExec (started by the SuperNode) polls it for ClientApp tasks over loopback;
# Flower's default is 1 s.
_SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
_SUPEREXEC_POLL = 0.1
# Flower sleeps 3 s between empty polls of the SuperLink and 0.5 s between looks at its
# own state while a ClientApp works; sleeps up to this long are the latter.
_LOCAL_WAIT_MAX = 1.0
_LOCAL_WAIT = 0.05
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
    env.setdefault(_SUPEREXEC_POLL_ENV, str(_SUPEREXEC_POLL))
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


class _ShortPollClock:
    """`time` for Flower's SuperNode loop, with medfed's polling.

    Empty polls of the SuperLink (network; Flower sleeps 3 s after each) back off from
    0.05 s right after the node answered a message, when the next one is due within a
    second or so, doubling up to `cap` while nothing comes. The short sleeps while the
    node waits on its own ClientApp (local state) last at most 0.05 s.
    """

    def __init__(self, cap: float) -> None:
        self.cap = cap
        self.idle = 0  # empty polls since the node last answered a message

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def answered(self) -> None:
        """The node sent a reply: poll soon again."""
        self.idle = 0

    def sleep(self, seconds: float) -> None:
        if seconds <= _LOCAL_WAIT_MAX:
            time.sleep(min(seconds, _LOCAL_WAIT))
            return
        time.sleep(min(seconds, self.cap, _LOCAL_WAIT * 2.0 ** min(self.idle, 16)))
        self.idle += 1


class _WarmSuperExec:
    """`subprocess` for Flower's SuperNode: its SuperExec is medfed's warm one."""

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(command: list[str], *args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        if command[:1] == ["flower-superexec"]:
            command = [sys.executable, "-m", "client.superexec", *command[1:]]
        return subprocess.Popen(command, *args, **kwargs)


def _guard_apps(module: Any, gate: AppGate) -> None:
    """Check every new run's app at `gate` before Flower stores the run or creates a task.

    An untrusted app's message is answered with an error naming the app, as Flower
    answers a FAB that fails its own verification; the run is not stored, so each of
    its later messages is checked and refused again.
    """
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    pull_and_store = module._pull_and_store_message

    def guarded(*, state: Any, object_store: Any, receive: Any, get_fab: Any, **kw: Any) -> Any:
        received: list[Message] = []

        def remember() -> Any:
            got = receive()
            if got is not None:
                received.append(got[0])
            return got

        def admitted_fab(fab_hash: str, run_id: int) -> Any:
            fab = get_fab(fab_hash, run_id)
            gate.admit(fab.content, fab.hash_str, run_id)
            return fab

        try:
            return pull_and_store(
                state=state,
                object_store=object_store,
                receive=remember,
                get_fab=admitted_fab,
                **kw,
            )
        except UntrustedApp as err:
            context_logger(site=gate.site).error("%s", err)
            reply = Message(Error(ErrorCode.INVALID_FAB, str(err)), reply_to=received[-1])
            module._insert_message(reply, state, object_store)
            return received[-1].metadata.run_id

    module._pull_and_store_message = guarded


def _main(argv: list[str]) -> None:
    """`flower-supernode` with the site's app check, idle poll, heartbeat, warm ClientApps."""
    from flwr.supercore import heartbeat as flwr_heartbeat
    from flwr.supercore.logger import update_console_handler
    from flwr.supernode import fleet_http_connection, start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from federation.flowerpull import short_pull_backoff

    try:
        gate = AppGate.from_env()
    except UntrustedApp as err:
        sys.exit(f"medfed: {err}")
    trusted = gate.trusted()  # the release's digest is computed once, before any message
    context_logger(site=gate.site).info(
        "this site runs only these apps: %s",
        "; ".join(f"{d[:16]} ({why})" for d, why in trusted.items()) or "none",
    )
    _guard_apps(start_client_internal, gate)
    cap = float(os.environ.get(POLL_INTERVAL_ENV, _DEFAULT_POLL))
    clock = _ShortPollClock(cap)
    start_client_internal.time = clock  # type: ignore[assignment]
    push_messages = start_client_internal._push_messages

    def push_and_poll_soon(*args: Any, **kwargs: Any) -> None:
        push_messages(*args, **kwargs)
        clock.answered()

    start_client_internal._push_messages = push_and_poll_soon
    short_pull_backoff(start_client_internal, "pull_objects")
    if os.environ.get(WARM_ENV, "1") != "0":
        start_client_internal.subprocess = _WarmSuperExec()  # type: ignore[assignment]
    heartbeat = float(os.environ.get(HEARTBEAT_ENV, _DEFAULT_HEARTBEAT))
    # The interval the node announces, and the one its sender beats at: keep them equal.
    fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL = heartbeat  # type: ignore[assignment]
    flwr_heartbeat.HEARTBEAT_DEFAULT_INTERVAL = heartbeat  # type: ignore[assignment]
    # The site's log says when each message came and went; colours only on a terminal.
    update_console_handler(timestamps=True, colored=sys.stderr.isatty())
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


if __name__ == "__main__":
    _main(sys.argv[1:])
