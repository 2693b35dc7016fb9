"""Every change medfed makes to Flower's internals, in one place, written for Flower 1.41.

Everywhere else medfed uses Flower's public API. What Flower 1.41 does not let a caller
set is changed here, and nowhere else:

- `guard_new_runs` (`start_client_internal._pull_and_store_message`): a site checks a
  run's app before any task of it is created.
- `short_supernode_polls` (`start_client_internal.time`, `._push_messages`,
  `.pull_objects`): Flower sleeps 3 s after each empty poll of the SuperLink and 0.5 s
  while its ClientApp works.
- `heartbeat_interval` (`HEARTBEAT_DEFAULT_INTERVAL`, two modules): at 30 s, a crashed
  site stalls a round for a minute.
- `warm_clientapps` (`start_client_internal.subprocess`, `._pull_and_store_message`,
  `superexec.executor.factory.SubprocessExecutor`, `run_superexec.time`,
  `.register_signal_handlers`, `.AutoExecPlugin`), with `serve_warm_clientapp`
  (`run_clientapp.flwr_exit`): Flower starts its SuperExec as a second process that
  asks the SuperNode for tasks over HTTP at an interval, and a new Python, which
  imports torch again, for every message.
- `short_serverapp_pulls`, `short_clientapp_pulls` (`pull_objects`,
  `pull_and_inflate_object_from_tree`): 1, 2, 4 ... s waits for a message's parts.
- `installed_fabs_kept` (`run_clientapp.install_from_fab`): a ClientApp unpacks and
  checks its app for every message before it finds it installed.
- `simulation_workers` (`vce_api.ThreadPoolExecutor`): cores + 4 workers, so other
  sites wait a turn.
- `telemetry_events_off` (`telemetry.create_event`): with telemetry off, Flower still
  builds each event, starting a process to do so.
- `lean_fleet_middleware` (`superlink.main._get_middleware`): every request to the
  SuperLink passes nine Starlette `BaseHTTPMiddleware` layers (~0.4 ms of CPU each on a
  2-core machine), six of which have nothing to do for a Fleet request.
- `direct_runtime_middleware` (`supernode.main.create_app`), with the above: a
  `BaseHTTPMiddleware` layer streams each answer through a task group and memory
  streams; for one-message answers its own dispatch runs directly (`_Direct`, ~0.6 ms
  less CPU per layer).
- `fleet_connections_kept` (`fleet_http_connection.FleetHttpClient`): the SuperNode's
  HTTP client closes a connection idle for 5 s, so a request after a pause (a heartbeat,
  a reply pushed beside a held poll) opens a new TLS connection to the SuperLink.
- `held_fleet_polls` (the Fleet router's `/pull-messages` route,
  `InMemoryLinkState`/`SqlLinkState.store_message_ins`, `.store_message_and_object_tree`):
  Flower answers an empty poll at once, so a waiting site polls again and again.

Each function first checks the installed Flower and refuses any other series with
`FlowerVersionError`, so an upgrade stops the process at start instead of misbehaving in
a round; `medfed` checks it once when it starts.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.metadata
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Annotated, Any

__all__ = [
    "FLEET_KEEPALIVE",
    "FLOWER_SERIES",
    "HELD_POLL",
    "PULL_BACKOFF",
    "STARTED",
    "FlowerVersionError",
    "ShortPollClock",
    "check_flower_version",
    "direct_runtime_middleware",
    "fleet_connections_kept",
    "guard_new_runs",
    "heartbeat_interval",
    "held_fleet_polls",
    "installed_fabs_kept",
    "lean_fleet_middleware",
    "run_superlink",
    "run_supernode",
    "serve_warm_clientapp",
    "short_clientapp_pulls",
    "short_serverapp_pulls",
    "short_supernode_polls",
    "simulation_workers",
    "telemetry_events_off",
    "warm_clientapps",
]

FLOWER_SERIES = "1.41"
# Waits between pulls of a message's parts: first, and at most (seconds).
PULL_BACKOFF = (0.05, 0.5)
# Logged by a warm ClientApp process as it starts each task, like Flower's own start line.
STARTED = "Start warm ClientApp task"
# Flower sleeps 3 s between empty polls of the SuperLink and 0.5 s between looks at its
# own state while a ClientApp works; sleeps up to this long are the latter.
_LOCAL_WAIT_MAX = 1.0
_LOCAL_WAIT = 0.05
# A poll of the SuperLink that lasted this long (s) was held there (`held_fleet_polls`).
HELD_POLL = 1.0
# How often a held poll that found a message looks whether all its parts arrived (s).
_PARTS_RECHECK = 0.05
# First empty poll of the SuperLink after the node answered a message (seconds): the
# run's next message is rarely due sooner, and each poll costs the SuperLink several ms
# of CPU.
_FIRST_POLL = 0.2
# A SuperNode keeps an idle connection to the SuperLink this long (s): longer than a
# round or a heartbeat interval, shorter than the gate's own idle limit.
FLEET_KEEPALIVE = 240.0
# A warm ClientApp process idle this long (s) ends; so does one of an earlier run as
# soon as a task of another run comes.
RUN_WORKER_IDLE = 300.0


class FlowerVersionError(RuntimeError):
    """The installed Flower is not the one medfed's adaptations were written for."""


def check_flower_version(installed: str | None = None) -> None:
    """Refuse any Flower but the series medfed adapts.

    Raises:
        FlowerVersionError: Another version is installed (named, with what to install).
    """
    installed = installed or importlib.metadata.version("flwr")
    if not installed.startswith(FLOWER_SERIES + "."):
        raise FlowerVersionError(
            f"medfed adapts Flower {FLOWER_SERIES} internals (federation/flowerpatch.py) "
            f"but flwr {installed} is installed; install `flwr>={FLOWER_SERIES},<1.42` "
            "(pip install -e . does), or port federation/flowerpatch.py to the new Flower"
        )


def _rebind(module: ModuleType | type, name: str, make: Callable[[Any], Any]) -> None:
    """Replace `module.name` (a module's or a class's) with `make(old)`, after the version check."""
    check_flower_version()
    if not hasattr(module, name):
        raise FlowerVersionError(f"Flower's {module.__name__} has no {name!r} to adapt")
    setattr(module, name, make(getattr(module, name)))


def _short_pulls(module: ModuleType, name: str) -> None:
    """Rebind Flower's pull function `module.name` with short waits (idempotent)."""
    if isinstance(getattr(module, name, None), functools.partial):
        return
    _rebind(
        module,
        name,
        lambda pull: functools.partial(
            pull, initial_backoff=PULL_BACKOFF[0], backoff_cap=PULL_BACKOFF[1]
        ),
    )


def short_serverapp_pulls() -> None:
    """The ServerApp pulls the sites' replies from the SuperLink with short waits."""
    from flwr.superlink.grid import http_grid

    _short_pulls(http_grid, "pull_objects")


def short_clientapp_pulls() -> None:
    """The ClientApp pulls its message from the SuperNode with short waits."""
    from flwr.supernode.runtime import run_clientapp

    _short_pulls(run_clientapp, "pull_and_inflate_object_from_tree")


class ShortPollClock:
    """`time` for Flower's SuperNode loop, with medfed's polling.

    Empty polls of the SuperLink (network; Flower sleeps 3 s after each) back off from
    0.2 s right after the node answered a message, when the next one is due within a
    second or so, doubling up to `cap` while nothing comes. A poll the SuperLink held
    (`held_fleet_polls`: it lasted `HELD_POLL` s or more) is followed by the next at
    once. The short sleeps while the node waits on its own ClientApp (local state) last
    at most 0.05 s.
    """

    def __init__(self, cap: float) -> None:
        self.cap = cap
        self.idle = 0  # empty polls since the node last answered a message
        self.woke = time.monotonic()  # when the node last went on (a poll started soon after)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def answered(self) -> None:
        """The node sent a reply: poll soon again."""
        self.idle = 0
        self.woke = time.monotonic()

    def sleep(self, seconds: float) -> None:
        """Sleep as Flower asked, shortened as the class says."""
        if seconds <= _LOCAL_WAIT_MAX:
            time.sleep(min(seconds, _LOCAL_WAIT))
            return
        if time.monotonic() - self.woke < HELD_POLL:
            time.sleep(min(seconds, self.cap, _FIRST_POLL * 2.0 ** min(self.idle, 16)))
            self.idle += 1
        self.woke = time.monotonic()


def short_supernode_polls(cap: float) -> None:
    """The SuperNode polls the SuperLink and its ClientApps as `ShortPollClock` says."""
    from flwr.supernode import start_client_internal

    clock = ShortPollClock(cap)
    _rebind(start_client_internal, "time", lambda _: clock)

    def poll_soon_after(push: Callable[..., None]) -> Callable[..., None]:
        def push_and_poll_soon(*args: Any, **kwargs: Any) -> None:
            push(*args, **kwargs)
            clock.answered()

        return push_and_poll_soon

    _rebind(start_client_internal, "_push_messages", poll_soon_after)
    _short_pulls(start_client_internal, "pull_objects")


def heartbeat_interval(seconds: float) -> None:
    """The interval the SuperNode announces, and the one its sender beats at (kept equal)."""
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    for module in (fleet_http_connection, heartbeat):
        _rebind(module, "HEARTBEAT_DEFAULT_INTERVAL", lambda _: seconds)


def fleet_connections_kept(seconds: float = FLEET_KEEPALIVE) -> None:
    """The SuperNode keeps idle TLS connections to the SuperLink for `seconds`, not 5."""
    import httpx
    from flwr.supernode import fleet_http_connection

    def kept(flower_client: Any) -> Any:
        class KeptAlive(flower_client):
            def __init__(
                self, base_url: str, *, verify: Any = True, timeout: float = 30.0, **kw: Any
            ) -> None:
                super().__init__(base_url, verify=verify, timeout=timeout, **kw)
                self._client.close()  # Flower's, built with httpx's default limits
                self._client: httpx.Client = httpx.Client(
                    verify=verify,
                    timeout=timeout,
                    follow_redirects=True,
                    limits=httpx.Limits(keepalive_expiry=seconds),
                )

        return KeptAlive

    _rebind(fleet_http_connection, "FleetHttpClient", kept)


def guard_new_runs(
    admit: Callable[[bytes, str, int], object],
    refused: type[Exception],
    on_refused: Callable[[Exception], None],
) -> None:
    """Call `admit(fab, fab_hash, run_id)` before the SuperNode stores a new run.

    When it raises `refused`, the message is answered with an error that carries the
    exception's text, as Flower answers a FAB that fails its own verification; the run is
    not stored, so each of its later messages is checked and refused again.
    """
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode
    from flwr.supernode import start_client_internal as sci

    def guard(pull_and_store: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(*, state: Any, object_store: Any, receive: Any, get_fab: Any, **kw: Any) -> Any:
            received: list[Message] = []

            def remember() -> Any:
                got = receive()
                if got is not None:
                    received.append(got[0])
                return got

            def admitted_fab(fab_hash: str, run_id: int) -> Any:
                fab = get_fab(fab_hash, run_id)
                admit(fab.content, fab.hash_str, run_id)
                return fab

            try:
                return pull_and_store(
                    state=state,
                    object_store=object_store,
                    receive=remember,
                    get_fab=admitted_fab,
                    **kw,
                )
            except refused as err:
                on_refused(err)
                reply = Message(Error(ErrorCode.INVALID_FAB, str(err)), reply_to=received[-1])
                sci._insert_message(reply, state, object_store)
                return received[-1].metadata.run_id

        return guarded

    _rebind(sci, "_pull_and_store_message", guard)


class _SuperExecThread:
    """`subprocess` for Flower's SuperNode: its SuperExec runs in a thread of the node."""

    def __init__(self) -> None:
        self.woken = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    def Popen(self, command: list[str], *args: Any, **kwargs: Any) -> Any:
        if command[:1] != ["flower-superexec"]:
            return subprocess.Popen(command, *args, **kwargs)
        thread = threading.Thread(
            target=self._run, args=(command[1:],), name="superexec", daemon=True
        )
        thread.start()
        return thread  # Flower keeps no handle on its SuperExec

    def wake(self) -> None:
        """Tell the SuperExec that a message waits for a ClientApp."""
        self.woken.set()

    def sleep(self, seconds: float) -> None:
        """The SuperExec's wait between task requests: `seconds`, or until woken."""
        self.woken.wait(seconds)
        self.woken.clear()  # the task request that follows sees whatever woke it

    @staticmethod
    def _run(argv: list[str]) -> None:
        """Flower's SuperExec loop with `flower-superexec ARGV`; its end ends the node."""
        from logging import ERROR

        from flwr.supercore import log
        from flwr.supercore.cli.flower_superexec import _parse_args
        from flwr.supercore.superexec.run_superexec import run_superexec

        args = _parse_args().parse_args(argv)
        try:
            run_superexec(
                runtime_api_address=args.runtime_api_address,
                insecure=args.insecure,
                root_certificates_path=args.root_certificates,
                runtime_dependency_install=args.runtime_dependency_install,
            )
        except BaseException as err:  # any end is fatal, reported below
            log(ERROR, "the SuperExec stopped (%r): this site cannot run ClientApps", err)
        else:
            log(ERROR, "the SuperExec stopped: this site cannot run ClientApps")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # a SuperNode without its SuperExec would take messages it never answers


def warm_clientapps(*, preload: list[str], warm: Callable[[str], bool], nice: int = 0) -> None:
    """The SuperNode runs its SuperExec in a thread, which forks warm ClientApps.

    Flower starts its SuperExec as a second process (its own imports and memory) that
    asks the SuperNode for tasks over HTTP at an interval, and every ClientApp as a new
    Python that imports torch again. Here the SuperExec is a thread of the SuperNode,
    woken as soon as the node stored a message, and ClientApp tasks whose FAB hash is
    `warm` run in a process forked from a fork server that imported `preload` once: one
    process per run, which runs that run's tasks one after another (a second task comes
    to it only once the first ended; one arriving meanwhile gets a process of its own),
    at niceness `nice`. Other tasks start as Flower starts them.
    """
    import multiprocessing
    from multiprocessing import forkserver

    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec import run_superexec
    from flwr.supercore.superexec.executor import LaunchResult, SubprocessExecutor, factory
    from flwr.supernode import start_client_internal

    launcher = _SuperExecThread()
    _rebind(start_client_internal, "subprocess", lambda _: launcher)
    # The node's own handlers stop the process; signals reach only the main thread.
    _rebind(run_superexec, "register_signal_handlers", lambda _: lambda **_kw: None)
    _rebind(run_superexec, "time", lambda _: _ClockOf(launcher.sleep))

    def wake_after(pull_and_store: Callable[..., Any]) -> Callable[..., Any]:
        def pull_store_and_wake(**kwargs: Any) -> Any:
            run_id = pull_and_store(**kwargs)
            if run_id is not None:
                launcher.wake()
            return run_id

        return pull_store_and_wake

    _rebind(start_client_internal, "_pull_and_store_message", wake_after)

    class WarmExecutor(SubprocessExecutor):
        """Flower's subprocess executor, with warm ClientApp tasks run in forked workers."""

        def __init__(self) -> None:
            super().__init__()
            self._ctx = multiprocessing.get_context("forkserver")
            self._ctx.set_forkserver_preload(preload)
            forkserver.ensure_running()  # import now, not when the first message arrives
            self._workers: list[_RunWorker] = []
            self._serve = functools.partial(serve_warm_clientapp, nice=nice)
            self.run_id: int | None = None  # of the task being launched (RunAwarePlugin)

        def launch(self, spec: Any) -> Any:
            if spec.task_type != TaskType.CLIENT_APP or not warm(spec.fab_hash):
                return super().launch(spec)
            self.reconcile()
            for worker in self._workers:
                if worker.run_id == self.run_id and worker.take(spec):
                    return LaunchResult.accepted()
            try:
                self._workers.append(_RunWorker(self._ctx, self.run_id, spec, serve=self._serve))
            except OSError as err:
                return LaunchResult.failed(f"cannot fork a warm ClientApp: {err}")
            return LaunchResult.accepted()

        def reconcile(self) -> None:
            """Close workers gone, idle too long, or idle of a run before the newest."""
            kept = []
            for worker in self._workers:
                idle = worker.idle_for()
                if idle is not None and (idle > RUN_WORKER_IDLE or worker.run_id != self.run_id):
                    worker.close()
                elif worker.alive():
                    kept.append(worker)
            self._workers = kept
            multiprocessing.active_children()  # reaps ended workers and cold ClientApps

        def close(self) -> None:
            for worker in self._workers:
                worker.close()

    class RunAwarePlugin(run_superexec.AutoExecPlugin):
        """Flower's plugin, telling the executor which run a task it launches belongs to."""

        def launch_task(self, token: str, task: Any) -> Any:
            if isinstance(self.executor, WarmExecutor):
                self.executor.run_id = task.run_id
            return super().launch_task(token, task)

    _rebind(run_superexec, "AutoExecPlugin", lambda _: RunAwarePlugin)
    _rebind(factory, "SubprocessExecutor", lambda _: WarmExecutor)


class _ClockOf:
    """`time` whose `sleep` is `sleep`."""

    def __init__(self, sleep: Callable[[float], None]) -> None:
        self.sleep = sleep

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


class _RunWorker:
    """The SuperExec's end of one warm ClientApp process of one run at this site."""

    def __init__(
        self, ctx: Any, run_id: int | None, spec: Any, *, serve: Callable[[Any, Any], None]
    ) -> None:
        self.run_id = run_id
        self._conn, theirs = ctx.Pipe()
        self.process = ctx.Process(target=serve, args=(theirs, spec), daemon=False)
        self.process.start()
        theirs.close()
        self._idle_since: float | None = None  # None while it runs a task

    def _settle(self) -> None:
        """Read the worker's word that its task ended, if it said so."""
        try:
            while self._idle_since is None and self._conn.poll():
                self._conn.recv()
                self._idle_since = time.monotonic()
        except (EOFError, OSError):  # it ended: neither idle nor alive
            self._idle_since = None
            self.process.join(0)

    def alive(self) -> bool:
        """Whether its process still runs."""
        return self.process.is_alive()

    def idle_for(self) -> float | None:
        """Seconds since its last task ended; None while busy or ended."""
        self._settle()
        if self._idle_since is None or not self.alive():
            return None
        return time.monotonic() - self._idle_since

    def take(self, spec: Any) -> bool:
        """Run `spec` here if idle; False if busy or gone."""
        if self.idle_for() is None:
            return False
        try:
            self._conn.send(spec)
        except OSError:
            return False
        self._idle_since = None
        return True

    def close(self) -> None:
        """Ask it to end once its task (if any) is over; it ends on its own."""
        with contextlib.suppress(OSError):
            self._conn.send(None)
        self._conn.close()


class _TaskEnded(Exception):
    """Flower's ClientApp ended its task (`flwr_exit` with the exit code)."""


def serve_warm_clientapp(conn: Any, spec: Any, *, nice: int = 0) -> None:
    """Body of a forked warm ClientApp process: `spec`'s task, then each one sent on `conn`.

    Flower's `run_clientapp` (what `flwr-clientapp --token ...` runs) serves one task and
    exits the process. Here it runs tasks of one run one after another: a task ends with
    its exit handlers run (its output pushed, its heartbeat stopped) and the process goes
    on, keeping what the first task built (allocator, kernels, caches): a second epoch
    in one process costs about 0.4 CPU-s against 0.5-0.7 in a fresh one. The process runs
    at niceness `nice` at least.
    """
    os.setpriority(os.PRIO_PROCESS, 0, max(nice, os.getpriority(os.PRIO_PROCESS, 0)))
    # What the fork server imported is never collected here: a collection would write to
    # every object it visits, copying the pages this process shares with the fork server.
    gc.freeze()
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.exit.exit_handler import trigger_exit_handlers
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime import run_clientapp

    from federation.logs import context_logger, setup_logging

    def task_exit(code: int, *args: Any, **kwargs: Any) -> None:
        trigger_exit_handlers(run_before_force_exit=True)
        trigger_exit_handlers(run_before_force_exit=False)
        raise _TaskEnded(code)

    if spec.suppress_output:  # as Flower's executor does for such tasks
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    if spec.parent_pid is not None:  # once here, not a watcher thread per task
        start_parent_process_monitor(spec.parent_pid)
    _rebind(run_clientapp, "flwr_exit", lambda _: task_exit)
    telemetry_events_off()
    # A warm ClientApp asks for its message at once, often before the SuperNode holds
    # all of it: poll for the rest briefly.
    short_clientapp_pulls()
    installed_fabs_kept()
    setup_logging(site=True)  # as each task's ClientApp does: Flower's INFO goes quiet
    log = context_logger()
    while spec is not None:
        log.info(
            "%s (task %d, niceness %d, process %d)",
            STARTED,
            spec.task_id,
            os.getpriority(os.PRIO_PROCESS, 0),
            os.getpid(),
        )
        with contextlib.suppress(_TaskEnded):
            run_clientapp.run_clientapp(
                runtime_api_address=spec.runtime_api_address,
                token=spec.token,
                insecure=spec.insecure,
                certificates=validate_and_resolve_root_certificates(
                    spec.root_certificates_path, spec.insecure
                ),
                parent_pid=None,
                runtime_dependency_install=spec.runtime_dependency_install,
            )
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            conn.send(True)
            spec = conn.recv()
        except (EOFError, OSError):  # the SuperExec is gone
            spec = None


def telemetry_events_off() -> None:
    """With Flower's telemetry off, its events cost nothing.

    Flower builds each event before it checks whether telemetry is on (medfed turns it
    off, `federation/__init__.py`): that reads the platform, and `platform.architecture`
    runs `file` on the Python binary, a new process, twice for every ClientApp.
    """
    from flwr.supercore import telemetry

    if telemetry.FLWR_TELEMETRY_ENABLED != "1":
        _rebind(telemetry, "create_event", lambda _: lambda *args, **kwargs: "")


def installed_fabs_kept() -> None:
    """A ClientApp uses its app as already installed instead of installing it again.

    Flower unpacks the app (FAB) and checks every file's hash for each message before it
    finds the same app installed (15% of a warm ClientApp's time). The installed folder
    is named by the FAB's hash, and the site's SuperNode admitted this FAB's full hash
    before any task of the run (`guard_new_runs`); the first message installs it.
    """
    import hashlib
    import tomllib
    import zipfile
    from io import BytesIO

    from flwr.common.config import get_metadata_from_config
    from flwr.common.constant import APP_DIR, FAB_HASH_TRUNCATION
    from flwr.supercore.utils import get_flwr_home
    from flwr.supernode.runtime import run_clientapp

    def kept(install: Callable[..., Any]) -> Callable[..., Any]:
        def install_once(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(fab_file, bytes) and not args and kwargs.get("install_dir") is None:
                with zipfile.ZipFile(BytesIO(fab_file)) as fab:
                    project = tomllib.loads(fab.read("pyproject.toml").decode())
                fab_id, version = get_metadata_from_config(project)  # as Flower names it
                digest = hashlib.sha256(fab_file).hexdigest()[:FAB_HASH_TRUNCATION]
                folder = f"{fab_id.replace('/', '.')}.{version}.{digest}"
                path = get_flwr_home() / APP_DIR / folder
                if path.is_dir():
                    return path
            return install(fab_file, *args, **kwargs)

        return install_once

    _rebind(run_clientapp, "install_from_fab", kept)


@contextlib.contextmanager
def simulation_workers(sites: int) -> Iterator[None]:
    """Let Flower's simulation engine serve `sites` sites at once.

    Flower starts one worker thread per actor but in a thread pool of default size
    (cores + 4): on 2 cores, 6 of 10 sites train while the other 4 wait for a worker,
    and each round takes two turns. The pool is sized for every site here.
    """
    from concurrent.futures import ThreadPoolExecutor

    from flwr.server.superlink.fleet.vce import vce_api

    pool = vce_api.ThreadPoolExecutor
    size = max(sites, min(32, (os.cpu_count() or 1) + 4))
    _rebind(
        vce_api,
        "ThreadPoolExecutor",
        lambda _: functools.partial(ThreadPoolExecutor, max_workers=size),
    )
    try:
        yield
    finally:
        vce_api.ThreadPoolExecutor = pool  # type: ignore[misc]


class _Scoped:
    """An ASGI layer around a Starlette `Middleware` for the requests `when` selects."""

    def __init__(self, app: Any, *, middleware: Any, when: Callable[[Any], bool]) -> None:
        self.app = app
        self.when = when
        cls, args, kwargs = middleware
        self.inner = cls(app, *args, **kwargs)


class _Only(_Scoped):
    """ASGI middleware that runs `middleware` only for the requests `when` selects.

    The others go straight to the next layer, as `middleware` itself would pass them.
    """

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        layer = self.inner if scope["type"] != "http" or self.when(scope) else self.app
        await layer(scope, receive, send)


class _Direct(_Scoped):
    """ASGI form of a Starlette `BaseHTTPMiddleware` for the requests `when` selects.

    The middleware's own `dispatch` runs, with a `call_next` that awaits the next layer
    and keeps its response, instead of Starlette's task group, memory streams and
    streamed response per layer (most of a Fleet request's CPU on the SuperLink, whose
    Fleet answers are unary). Other requests pass through the middleware as Starlette
    runs it.
    """

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        from starlette.requests import Request
        from starlette.responses import Response

        if scope["type"] != "http" or not self.when(scope):
            await self.inner(scope, receive, send)
            return
        request = Request(scope, receive)
        body = [await request.body()]  # the next layer reads it again, once

        async def replay() -> Any:
            if body:
                return {"type": "http.request", "body": body.pop(), "more_body": False}
            return await receive()

        async def call_next(_: Any) -> Any:
            start: dict[str, Any] = {}
            chunks: list[bytes] = []

            async def keep(message: Any) -> None:
                if message["type"] == "http.response.start":
                    start.update(message)
                elif message["type"] == "http.response.body":
                    chunks.append(message.get("body", b""))

            await self.app(scope, replay, keep)
            if not start:
                raise RuntimeError("No response returned.")
            response = Response(b"".join(chunks), status_code=start["status"])
            response.raw_headers = list(start["headers"])
            return response

        response = await self.inner.dispatch_func(request, call_next)
        await response(scope, replay, send)


def _unary_path(scope: Any) -> bool:
    """A Fleet or runtime API request: one protobuf message in, one out."""
    return str(scope["path"]).startswith(("/v1/fleet/", "/v1/runtime/"))


def _direct(layer: Any) -> Any:
    """`layer` as `_Direct` for unary requests, where it is a `BaseHTTPMiddleware`."""
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware

    if not issubclass(layer.cls, BaseHTTPMiddleware):
        return layer
    return Middleware(_Direct, middleware=layer, when=_unary_path)


def direct_runtime_middleware() -> None:
    """The SuperNode's runtime API (its ClientApps' requests) runs its middleware directly.

    Its three Starlette `BaseHTTPMiddleware` layers (error and protobuf translation,
    runtime tracing) run their own dispatch code through `_Direct`.
    """
    from flwr.supernode import main

    def directed(create_app: Callable[..., Any]) -> Callable[..., Any]:
        def create_directed_app(*args: Any, **kwargs: Any) -> Any:
            app = create_app(*args, **kwargs)
            app.user_middleware[:] = [_direct(layer) for layer in app.user_middleware]
            return app

        create_directed_app.medfed_direct = True  # type: ignore[attr-defined]
        return create_directed_app

    if not getattr(main.create_app, "medfed_direct", False):
        _rebind(main, "create_app", directed)


def lean_fleet_middleware() -> None:
    """Fleet requests skip the SuperLink middleware that only acts on other requests.

    Of the nine layers Flower 1.41 puts before every handler, the Control API's four act
    only on `/v1/control/` paths, runtime tracing only on Runtime API results, and the
    Fleet event log only when a plugin writes one; each still costs a Fleet request a
    Starlette `BaseHTTPMiddleware` pass. Error translation, protobuf translation and
    node authentication run for every request. For Fleet and runtime API requests
    (sites, ServerApp) every layer that runs, runs directly (`_Direct`).
    """
    from flwr.supercore.routers.runtime.tracing import RuntimeTracingMiddleware
    from flwr.superlink import main
    from flwr.superlink.routers.control import middlewares as control
    from flwr.superlink.routers.fleet.middlewares import FleetEventLogMiddleware
    from starlette.middleware import Middleware

    if getattr(main._get_middleware, "medfed_lean", False):
        return
    if not all(path.startswith("/v1/control/") for _, path in control.CONTROL_SENSITIVE_ROUTE_KEYS):
        raise FlowerVersionError("Flower's sensitive Control routes left /v1/control/")

    def control_path(scope: Any) -> bool:
        return str(scope["path"]).startswith("/v1/control/")

    def fleet_path(scope: Any) -> bool:
        return str(scope["path"]).startswith("/v1/fleet/")

    def fleet_log(scope: Any) -> bool:
        plugin = getattr(scope["app"].state, "fleet_event_log_plugin", None)
        return plugin is not None and fleet_path(scope)

    when: dict[type, Callable[[Any], bool]] = {
        control.ControlSensitiveResponseMiddleware: control_path,
        control.ControlAuthenticationMiddleware: control_path,
        control.ControlLicenseMiddleware: control_path,
        control.ControlEventLogMiddleware: control_path,
        RuntimeTracingMiddleware: lambda scope: not fleet_path(scope),
        FleetEventLogMiddleware: fleet_log,
    }

    def lean_layer(m: Any) -> Any:
        if m.cls in when:
            return Middleware(_Only, middleware=_direct(m), when=when[m.cls])
        return _direct(m)

    def lean(get_middleware: Callable[[], list[Any]]) -> Callable[[], list[Any]]:
        def middleware() -> list[Any]:
            return [lean_layer(m) for m in get_middleware()]

        middleware.medfed_lean = True  # type: ignore[attr-defined]
        return middleware

    _rebind(main, "_get_middleware", lean)


class _Arrivals:
    """Which held Fleet polls wait for a message to which node; wakes them when one comes.

    Written to by the SuperLink's handler threads, waited on in its event loop.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[int, set[tuple[Any, Any]]] = {}

    @contextlib.contextmanager
    def watch(self, node_id: int) -> Iterator[Any]:
        """An `asyncio.Event` set when a message for `node_id` is stored from now on."""
        import asyncio

        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiting.setdefault(node_id, set()).add(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:
                waiting = self._waiting[node_id]
                waiting.discard(entry)
                if not waiting:
                    del self._waiting[node_id]

    def arrived(self, node_id: int) -> None:
        """A message for `node_id` was stored: wake its polls."""
        with self._lock:
            waiting = list(self._waiting.get(node_id, ()))
        for loop, event in waiting:
            loop.call_soon_threadsafe(event.set)


def held_fleet_polls(hold: float, *, recheck: float = 1.0) -> None:
    """The SuperLink holds a site's empty poll for messages up to `hold` seconds.

    Flower answers each poll at once, so a waiting site asks again and again, and every
    poll costs the SuperLink a request's CPU (HTTP, TLS, node authentication) and the
    site its own. A held poll answers once the ServerApp stored a message for the node
    and all its parts (or `hold` passes), looking again at least every `recheck`
    seconds; it holds no thread while it waits. The answer is Flower's own pull
    handler's.
    """
    import asyncio

    from fastapi.routing import APIRoute
    from flwr.proto.fleet_pb2 import PullMessagesRequest, PullMessagesResponse
    from flwr.server.superlink.linkstate import InMemoryLinkState, LinkState, SqlLinkState
    from flwr.supercore.inflatable.inflatable_object import iterate_object_tree as walk
    from flwr.superlink.routers.fleet import router as fleet
    from flwr.superlink.servicer.fleet import fleet_handlers
    from starlette.concurrency import run_in_threadpool

    check_flower_version()
    path = f"{fleet.router.prefix}/pull-messages"
    routes = [r for r in fleet.router.routes if isinstance(r, APIRoute) and r.path == path]
    if len(routes) != 1:
        raise FlowerVersionError(f"Flower's Fleet router has no single {path} route to hold")
    if getattr(routes[0].endpoint, "medfed_held", False):
        return
    arrivals = _Arrivals()

    def waking(store: Callable[..., Any], stored: Callable[[Any], bool]) -> Callable[..., Any]:
        def store_and_wake(self: LinkState, message: Any, *args: Any, **kwargs: Any) -> Any:
            out = store(self, message, *args, **kwargs)
            if stored(out) and not message.metadata.reply_to_message_id:
                arrivals.arrived(message.metadata.dst_node_id)
            return out

        return store_and_wake

    # The ServerApp stores through `store_message_and_object_tree`, which calls
    # `store_message_ins` inside its transaction: the SQL state's poll may only see the
    # message after the outer call returns, so both wake (a second wake costs one look).
    for state in (InMemoryLinkState, SqlLinkState):
        _rebind(state, "store_message_ins", lambda f: waking(f, lambda out: out is not None))
        _rebind(state, "store_message_and_object_tree", lambda f: waking(f, lambda out: out[0]))

    async def fleet_pull_messages(request: Any, state: Any) -> Any:
        """Handle Fleet pull messages, held until one comes (`held_fleet_polls`)."""
        until = time.monotonic() + hold
        while True:
            with arrivals.watch(request.node.node_id) as came:
                response = await run_in_threadpool(
                    fleet_handlers.pull_messages,
                    request=request,
                    state=state,
                    store=state.object_store,
                )
                left = until - time.monotonic()
                if response.messages_list or left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(came.wait(), min(left, recheck))
        # The ServerApp pushes a message's parts after the message: answer when they are
        # all there, or the site asks for each part again and again.
        parts = [t.object_id for tree in response.message_object_trees for t in walk(tree)]
        while time.monotonic() < until + hold:
            if all(await run_in_threadpool(lambda: [state.object_store.get(i) for i in parts])):
                break
            await asyncio.sleep(_PARTS_RECHECK)
        return response

    # What FastAPI reads to parse the request and inject the state, as on Flower's route.
    fleet_pull_messages.__annotations__ = {
        "request": Annotated[PullMessagesRequest, fleet.PROTOBUF_REQUEST_DEPENDENCY],
        "state": fleet.LinkStateDependency,
        "return": PullMessagesResponse,
    }
    fleet_pull_messages.medfed_held = True  # type: ignore[attr-defined]
    fleet.router.routes.remove(routes[0])
    fleet.router.add_api_route(
        "/pull-messages", fleet_pull_messages, methods=["POST"], name=routes[0].name
    )


def run_superlink(argv: list[str]) -> None:
    """Flower's `flower-superlink` with `argv`."""
    from flwr.superlink.cli.flower_superlink import flower_superlink

    check_flower_version()
    sys.argv = ["flower-superlink", *argv]
    flower_superlink()


def run_supernode(argv: list[str]) -> None:
    """Flower's `flower-supernode` with `argv`, its log lines time-stamped."""
    from flwr.supercore.logger import update_console_handler
    from flwr.supernode.cli.flower_supernode import flower_supernode

    check_flower_version()
    # The site's log says when each message came and went; colours only on a terminal.
    update_console_handler(timestamps=True, colored=sys.stderr.isatty())
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()
