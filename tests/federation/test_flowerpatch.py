"""medfed's changes to Flower's internals: the version they were written for, and each one."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from flwr.server.superlink.fleet.vce import vce_api

from federation import flowerpatch
from federation.flowerpatch import FlowerVersionError, ShortPollClock, check_flower_version


def test_the_installed_flower_is_the_one_adapted_and_another_is_refused_with_what_to_do() -> None:
    check_flower_version()
    with pytest.raises(FlowerVersionError, match=r"flwr 1\.42\.0 is installed; install"):
        check_flower_version("1.42.0")
    with pytest.raises(FlowerVersionError, match=r"flowerpatch\.py"):
        check_flower_version("1.4.1")  # not a prefix match of "1.41"


def test_the_cli_refuses_to_start_on_another_flower() -> None:
    # The site agent on another Flower stops at start, before any round (exit code 2).
    code = (
        "import importlib.metadata as m, sys; real = m.version;"
        "m.version = lambda name: '1.42.0' if name == 'flwr' else real(name);"
        "from medfed.cli import main; sys.exit(main(['config']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "medfed adapts Flower 1.41 internals" in done.stderr


def test_a_missing_internal_is_named_instead_of_patched_blindly() -> None:
    module = type(sys)("flwr.fake")
    with pytest.raises(FlowerVersionError, match=r"flwr\.fake has no 'pull_objects'"):
        flowerpatch._short_pulls(module, "pull_objects")


class FakeClock:
    """`time` whose clock moves only by what is slept or `pass_time` adds."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def monotonic(self) -> float:
        return self.now

    def pass_time(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(flowerpatch, "time", fake)
    return fake


@pytest.fixture
def slept(clock: FakeClock) -> list[float]:
    return clock.slept


def test_idle_polls_back_off_to_the_cap_and_restart_after_a_reply(slept: list[float]) -> None:
    clock = ShortPollClock(cap=2.0)
    for _ in range(6):
        clock.sleep(3)  # Flower's sleep after an empty poll of the SuperLink
    assert slept == [0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    clock.answered()
    clock.sleep(3)
    assert slept[-1] == 0.2


def test_waits_on_the_local_clientapp_stay_short_and_do_not_count_as_idle(
    slept: list[float],
) -> None:
    clock = ShortPollClock(cap=2.0)
    clock.sleep(0.5)  # Flower's wait for its ClientApp's reply
    clock.sleep(0.5)
    clock.sleep(3)
    assert slept == [0.05, 0.05, 0.2]


def test_a_poll_interval_below_the_first_step_is_kept(slept: list[float]) -> None:
    clock = ShortPollClock(cap=0.02)
    clock.sleep(3)
    clock.sleep(3)
    assert slept == [0.02, 0.02]


def test_a_poll_the_superlink_held_is_followed_by_the_next_at_once(clock: FakeClock) -> None:
    poll = ShortPollClock(cap=2.0)
    poll.sleep(3)  # Flower's loop polls, then sleeps: this poll was answered at once
    clock.pass_time(flowerpatch.HELD_POLL + 4)  # the next one was held until it ended
    poll.sleep(3)
    clock.pass_time(0.01)  # one answered at once backs off where it left off
    poll.sleep(3)
    assert clock.slept == [0.2, 0.4]


def test_a_stored_message_wakes_only_the_held_polls_of_its_node() -> None:
    import asyncio

    arrivals = flowerpatch._Arrivals()

    async def held(node_id: int) -> bool:
        with arrivals.watch(node_id) as came:
            try:
                await asyncio.wait_for(came.wait(), 2.0)
            except TimeoutError:
                return False
            return True

    async def main() -> list[bool]:
        polls = asyncio.gather(held(1), held(1), held(2))
        await asyncio.sleep(0.05)
        # The ServerApp's message is stored in a handler thread, not in the event loop.
        threading.Thread(target=arrivals.arrived, args=(1,)).start()
        return list(await polls)

    started = time.monotonic()
    assert asyncio.run(main()) == [True, True, False]
    assert time.monotonic() - started < 2.5
    assert arrivals._waiting == {}  # nothing left behind


def test_every_site_gets_a_simulation_worker_at_once() -> None:
    # Flower's engine runs its per-actor workers in `vce_api.ThreadPoolExecutor()`; each
    # loops until the run ends, so a worker that never starts leaves its site waiting.
    sites = 12
    barrier = threading.Barrier(sites, timeout=10)
    default = vce_api.ThreadPoolExecutor
    with flowerpatch.simulation_workers(sites):
        with vce_api.ThreadPoolExecutor() as pool:
            arrived = [pool.submit(barrier.wait) for _ in range(sites)]
        assert sorted(f.result() for f in arrived) == list(range(sites))
    assert vce_api.ThreadPoolExecutor is default


def test_the_superexec_sleeps_its_interval_unless_its_supernode_wakes_it() -> None:
    launcher = flowerpatch._SuperExecThread()
    started = time.monotonic()
    launcher.sleep(0.3)  # nobody woke it: the interval
    assert 0.25 <= time.monotonic() - started < 5.0
    threading.Timer(0.2, launcher.wake).start()  # the SuperNode stored a message
    started = time.monotonic()
    launcher.sleep(30.0)
    assert time.monotonic() - started < 5.0
    launcher.wake()  # a wake while the SuperExec asks for tasks ends its next sleep at once
    started = time.monotonic()
    launcher.sleep(30.0)
    assert time.monotonic() - started < 1.0
    started = time.monotonic()
    launcher.sleep(0.3)  # and only that one
    assert time.monotonic() - started >= 0.25


def test_a_clientapp_reuses_its_installed_app_and_installs_a_new_one(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib
    import io
    import zipfile

    from flwr.supernode.runtime import run_clientapp

    installs: list[bytes] = []
    monkeypatch.setattr(run_clientapp, "install_from_fab", lambda fab, **_: installs.append(fab))
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    flowerpatch.installed_fabs_kept()
    pyproject = '[project]\nname = "app"\nversion = "1.0"\n[tool.flwr.app]\npublisher = "pub"\n'
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as fab:
        fab.writestr("pyproject.toml", pyproject)
    content = buffer.getvalue()
    run_clientapp.install_from_fab(content, skip_prompt=True)
    assert installs == [content]  # not installed yet: Flower installs it
    folder = tmp_path / "apps" / f"pub.app.1.0.{hashlib.sha256(content).hexdigest()[:8]}"
    folder.mkdir(parents=True)
    assert run_clientapp.install_from_fab(content, skip_prompt=True) == folder
    assert installs == [content]  # the installed app, not unpacked and checked again


def test_with_telemetry_off_an_event_starts_no_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import platform

    from flwr.supercore import telemetry

    assert telemetry.FLWR_TELEMETRY_ENABLED == "0"  # medfed turns it off
    monkeypatch.setattr(telemetry, "create_event", telemetry.create_event)  # restored after

    def no_file_command(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("platform.architecture runs `file`, a new process")

    monkeypatch.setattr(platform, "architecture", no_file_command)
    with pytest.raises(AssertionError, match="file"):
        telemetry.create_event(telemetry.EventType.FLWR_CLIENTAPP_RUN_ENTER, None)
    flowerpatch.telemetry_events_off()
    assert telemetry.create_event(telemetry.EventType.FLWR_CLIENTAPP_RUN_ENTER, None) == ""


def test_fleet_requests_skip_only_the_superlink_middleware_with_nothing_to_do_for_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flwr.superlink import main
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    monkeypatch.setattr(main, "_get_middleware", main._get_middleware)  # restored after
    flower = main._get_middleware()
    flowerpatch.lean_fleet_middleware()
    flowerpatch.lean_fleet_middleware()  # once is enough
    lean = main._get_middleware()

    def cls_of(layer: Middleware) -> Any:
        while layer.cls in (flowerpatch._Only, flowerpatch._Direct):
            layer = layer.kwargs["middleware"]
        return layer.cls

    # The same layers in the same order; error and protobuf translation and node
    # authentication stay on every request.
    assert [cls_of(layer) for layer in lean] == [layer.cls for layer in flower]
    scoped = {cls_of(layer).__name__: layer for layer in lean if layer.cls is flowerpatch._Only}
    assert sorted(scoped) == [
        "ControlAuthenticationMiddleware",
        "ControlEventLogMiddleware",
        "ControlLicenseMiddleware",
        "ControlSensitiveResponseMiddleware",
        "FleetEventLogMiddleware",
        "RuntimeTracingMiddleware",
    ]
    assert "NodeAuthMiddleware" in {cls_of(layer).__name__ for layer in lean}
    # Every Starlette middleware runs directly for Fleet and runtime requests.
    for layer in lean:
        inner = layer.kwargs["middleware"] if layer.cls is flowerpatch._Only else layer
        assert (inner.cls is flowerpatch._Direct) == issubclass(cls_of(layer), BaseHTTPMiddleware)

    # Each scoped layer, with a stand-in that records the requests it saw.
    ran: list[tuple[str, str]] = []

    def recorder(name: str) -> type[BaseHTTPMiddleware]:
        class Recorder(BaseHTTPMiddleware):
            async def dispatch(self, request: Any, call_next: Any) -> Any:
                ran.append((name, request.url.path))
                return await call_next(request)

        return Recorder

    async def ok(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    paths = ("/v1/fleet/pull-messages", "/v1/control/list-runs", "/v1/runtime/pull-messages")
    app = Starlette(
        routes=[Route(path, ok, methods=["POST"]) for path in paths],
        middleware=[
            Middleware(
                flowerpatch._Only,
                middleware=flowerpatch._direct(Middleware(recorder(name))),
                when=layer.kwargs["when"],
            )
            for name, layer in scoped.items()
        ],
    )
    client = TestClient(app)
    for path in paths:
        assert client.post(path).text == "ok"
    assert not [name for name, path in ran if path == paths[0]]
    assert sorted(name for name, path in ran if path == paths[1]) == sorted(
        [*(n for n in scoped if n.startswith("Control")), "RuntimeTracingMiddleware"]
    )
    assert [name for name, path in ran if path == paths[2]] == ["RuntimeTracingMiddleware"]
    # A Fleet event log, where a plugin writes one, still sees every Fleet request.
    ran.clear()
    app.state.fleet_event_log_plugin = object()
    client.post(paths[0])
    assert ran == [("FleetEventLogMiddleware", paths[0])]


def _layered_app(direct: bool) -> Any:
    """Three layers that read the body, share request state and mark the answer, as
    Flower's do, before a unary route, a streaming route and a route that raises."""
    from flwr.supercore.error.http import http_error_translator
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    class Layer(BaseHTTPMiddleware):
        async def dispatch(self, request: Any, call_next: Any) -> Any:
            request.state.seen = getattr(request.state, "seen", 0) + len(await request.body())
            response = await call_next(request)
            response.headers["x-layers"] = str(int(response.headers.get("x-layers", 0)) + 1)
            return response

    async def unary(request: Any) -> Response:
        body = await request.body()
        return Response(body[::-1] + b"/" + str(request.state.seen).encode())

    async def stream(request: Any) -> StreamingResponse:
        async def parts() -> Any:
            for part in (b"a", b"b", b"c"):
                yield part

        return StreamingResponse(parts())

    async def fails(request: Any) -> Response:
        raise RuntimeError("internal detail")

    layers = [Middleware(BaseHTTPMiddleware, dispatch=http_error_translator)]
    layers += [Middleware(Layer) for _ in range(3)]
    routes = [
        Route("/v1/fleet/unary", unary, methods=["POST"]),
        Route("/v1/runtime/fails", fails, methods=["POST"]),
        Route("/v1/control/stream", stream, methods=["POST"]),
    ]
    middleware = [flowerpatch._direct(layer) for layer in layers] if direct else layers
    return Starlette(routes=routes, middleware=middleware)


def test_middleware_run_directly_answers_as_starlette_runs_it() -> None:
    from starlette.testclient import TestClient

    answers = []
    for direct in (False, True):
        client = TestClient(_layered_app(direct), raise_server_exceptions=False)
        answers.append(
            [
                (r.status_code, r.content, r.headers.get("x-layers"))
                for r in (
                    client.post("/v1/fleet/unary", content=b"abc"),
                    client.post("/v1/runtime/fails", content=b"abc"),
                    client.post("/v1/control/stream", content=b"abc"),
                )
            ]
        )
    assert answers[0] == answers[1]
    unary, fails, stream = answers[1]
    # Each layer and the route read the whole body; each layer marked the answer.
    assert unary == (200, b"cba/9", "3")
    assert fails[0] == 500 and b"internal detail" not in fails[1]  # Flower's error answer
    assert stream == (200, b"abc", "3")


def test_a_directed_supernode_app_runs_its_middleware_directly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flwr.supernode import main
    from starlette.middleware.base import BaseHTTPMiddleware

    monkeypatch.setattr(main, "create_app", main.create_app)  # restored after
    flower = [layer.cls for layer in main.create_app().user_middleware]
    flowerpatch.direct_runtime_middleware()
    flowerpatch.direct_runtime_middleware()  # once is enough
    directed = main.create_app().user_middleware
    assert flower and all(issubclass(cls, BaseHTTPMiddleware) for cls in flower)
    assert [layer.cls for layer in directed] == [flowerpatch._Direct] * len(flower)
    assert [layer.kwargs["middleware"].cls for layer in directed] == flower


def _serve_specs(conn: Any, spec: Any) -> None:
    """A worker as `serve_warm_clientapp` talks to its SuperExec: each spec here runs 0.3 s."""
    while spec is not None:
        time.sleep(0.3)
        conn.send(True)
        spec = conn.recv()


def _idle_within(worker: Any, seconds: float) -> float:
    deadline = time.monotonic() + seconds
    while (idle := worker.idle_for()) is None:
        assert time.monotonic() < deadline, "the worker never finished its task"
        time.sleep(0.02)
    return idle


def test_a_run_worker_takes_a_task_only_when_idle_and_ends_when_closed() -> None:
    ctx = multiprocessing.get_context("fork")
    worker = flowerpatch._RunWorker(ctx, 7, "task-1", serve=_serve_specs)
    assert worker.run_id == 7 and worker.alive()
    assert worker.idle_for() is None and not worker.take("task-2")  # busy with task-1
    assert _idle_within(worker, 10) >= 0
    assert worker.take("task-2")  # the same process runs the run's next task
    assert worker.idle_for() is None
    _idle_within(worker, 10)
    worker.close()
    worker.process.join(10)
    assert not worker.alive() and worker.process.exitcode == 0


def test_a_run_worker_that_died_is_neither_idle_nor_given_tasks() -> None:
    ctx = multiprocessing.get_context("fork")
    worker = flowerpatch._RunWorker(ctx, 7, "task-1", serve=_serve_specs)
    worker.process.kill()
    worker.process.join(10)
    assert worker.idle_for() is None and not worker.alive()
    assert not worker.take("task-2")
    worker.close()


def _connections_for_two_heartbeats(kept: float, gap: float) -> int:
    """How many connections the SuperNode's Fleet client opens to a plain loopback server."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest
    from flwr.supernode import fleet_http_connection

    peers: set[tuple[str, int]] = set()

    class Fleet(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            peers.add(self.client_address)
            self.send_response(200)
            self.send_header("content-type", "application/protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Fleet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    flowerpatch.fleet_connections_kept(kept)
    address = f"127.0.0.1:{server.server_address[1]}"
    try:
        with fleet_http_connection.FleetHttpClient.from_server_address(
            address, True, None, interceptors=[]
        ) as client:
            for _ in range(2):
                client.SendNodeHeartbeat(SendNodeHeartbeatRequest())
                time.sleep(gap)
    finally:
        server.shutdown()
    return len(peers)


def test_the_supernode_keeps_its_idle_fleet_connection_as_long_as_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Flower's client closes a connection idle for 5 s (httpx's default); each new one is
    # a TLS handshake with the gate.
    from flwr.supernode import fleet_http_connection
    from flwr.supernode.fleet_http_client import FleetHttpClient

    for kept, connections in ((0.2, 2), (30.0, 1)):
        monkeypatch.setattr(fleet_http_connection, "FleetHttpClient", FleetHttpClient)
        assert _connections_for_two_heartbeats(kept=kept, gap=0.6) == connections
