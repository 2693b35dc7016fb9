"""The consortium's control plane, tried as an outsider, a rogue coordinator and an impostor.

A real SuperLink (loopback only) behind the nginx Fleet gate, SuperNodes with their own
keys over TLS; one site runs cold ClientApps (MEDFED_WARM_CLIENTAPPS=0), and a fourth
enrolled site's node declares itself site-1.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from flwr.cli.build import build_fab_from_disk

from client.apptrust import AppGate
from client.governance import AuditLog
from client.superexec import STARTED
from client.supernode import WARM_ENV
from federation.appdigest import app_digest
from federation.provision import CoordinatorKit
from federation.security import load_public_key
from server.deploy import FlowerCli
from server.loop import RunHistory
from tests.conftest import REPO, SITES
from tests.deploy.conftest import (
    Cluster,
    make_consortium,
    medfed_env,
    teardown_on_sigterm,
)
from tests.helpers import SMALL

OUTSIDER = REPO / "scripts" / "security" / "outsider.py"
IMPOSTOR = "site-4"  # enrolled with its own key; its node declares itself site-1


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory, consortium) -> Iterator[Cluster]:
    data, _ = consortium
    made = make_consortium(tmp_path_factory.mktemp("plane"), data, [*SITES, IMPOSTOR])
    with teardown_on_sigterm(), contextlib.ExitStack() as stack:
        stack.callback(made.stop_all)
        made.start_superlink()
        made.start_site("site-1")
        made.start_site("site-2")
        made.start_site("site-3", env={WARM_ENV: "0"})
        impostor = made.site_kit(IMPOSTOR)
        info = json.loads((impostor / "site.json").read_text())
        (impostor / "site.json").write_text(json.dumps({**info, "site": "site-1"}))
        made.spawn(IMPOSTOR, "site", "start", "--kit", str(impostor),
                   "--data", str(data / "site-1"))  # fmt: skip
        made.wait_online(4)
        yield made


def _foreign_app(root: Path, marker: Path) -> Path:
    """The outsider script's small Flower app, whose ClientApp would write `marker`."""
    spec = importlib.util.spec_from_file_location("outsider", OUTSIDER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return Path(module.write_foreign_app(root, marker))


def _finish(cli: FlowerCli, run_id: int, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while not str(cli.run_info(run_id)["status"]).startswith("finished"):
        assert time.monotonic() < deadline, cli.log_text(run_id)[-4000:]
        time.sleep(1)
    return cli.log_text(run_id)


def test_the_superlink_itself_listens_on_loopback_only(plane: Cluster):
    link = json.loads((plane.coordinator / "superlink-home" / "link.json").read_text())
    port = int(link["control"].rsplit(":", 1)[1])
    listening = [
        c for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port
    ]
    assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening), listening
    # The gate answers anything but the Fleet API with 403, without reaching Flower.
    context = ssl.create_default_context(cafile=str(plane.coordinator / "ca.pem"))
    with (
        socket.create_connection(("127.0.0.1", plane.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"GET /docs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = tls.recv(4096)
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]


def test_an_outsider_with_the_ca_certificate_is_refused_everything(plane: Cluster):
    cli = FlowerCli(CoordinatorKit(plane.coordinator))
    nodes_before = sorted(n["node-id"] for n in cli.nodes())
    runs_before = cli.call("ls")["runs"]
    rogue = plane.site_kit("site-1") / "supernode.pub"  # a key the outsider would register
    proc = subprocess.run(
        [sys.executable, str(OUTSIDER), "--address", f"127.0.0.1:{plane.port}",
         "--ca", str(plane.coordinator / "ca.pem"), "--register", str(rogue),
         "--node-id", str(nodes_before[0]), "--wait", "10"],
        capture_output=True, text=True, timeout=600, env=medfed_env(), check=True,
    )  # fmt: skip
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["succeeded"]) == {
        "list runs", "list nodes", "start a run", "read a log", "stop a run",
        "register a key", "unregister a node",
    }  # fmt: skip
    assert not any(result["succeeded"].values()), proc.stdout
    assert result["foreign_code_ran_at"] == 0, proc.stdout
    # Nothing changed: same nodes, same runs.
    assert sorted(n["node-id"] for n in cli.nodes()) == nodes_before
    assert cli.call("ls")["runs"] == runs_before
    # The gate turned each one away itself, with 403.
    access = (plane.coordinator / "superlink-home" / "gate-access.log").read_text()
    for path in ("list-runs", "start-run", "stop-run", "stream-logs", "register-node",
                 "unregister-node", "list-nodes"):  # fmt: skip
        assert f'/v1/control/{path} HTTP/1.1" 403' in access, (path, access[-3000:])


def test_a_foreign_app_from_the_coordinator_is_refused_at_every_site(plane: Cluster, tmp_path):
    marker = tmp_path / "marker"
    app = _foreign_app(tmp_path, marker)
    digest = app_digest(build_fab_from_disk(app))
    cli = FlowerCli(CoordinatorKit(plane.coordinator))
    run_id = int(cli.call("run", str(app))["run-id"])
    log = _finish(cli, run_id)
    refusals = [line for line in log.splitlines() if "FOREIGN node" in line]
    assert len(refusals) == 4 and all(digest in line for line in refusals), log[-4000:]
    assert all("refused run" in line for line in refusals), refusals
    assert not marker.exists(), marker.read_text()
    # Each site wrote the refusal, with the app's digest, to its signed audit log.
    for site in [*SITES, IMPOSTOR]:
        state = plane.site_kit(site) / "state"
        entries = [e for e in AppGate(state, site).refusals() if e["details"]["app"] == digest]
        assert [e["details"]["run"] for e in entries] == [run_id], entries
        audit = AuditLog(state / "audit.jsonl", None, site)  # verifying needs no private key
        assert audit.verify(load_public_key(state / "site_key.pub")) == []
    # Cold (site-3) and warm sites alike never started a ClientApp for it.
    site3 = next(p for p in plane.procs if p.name == "site-3")
    assert "flwr-clientapp" not in site3.text().split(f"refused run {run_id}")[-1][:2000]

    # Once site-2 approves the app after review, site-2 (and only site-2) runs it.
    approve = plane.spawn(
        "approve", "site", "apps", "approve", digest[:16], "--by", "Dr. Ada",
        "--state", str(plane.site_kit("site-2") / "state"),
    )  # fmt: skip
    assert approve.popen.wait(timeout=120) == 0, approve.text()
    run_id = int(cli.call("run", str(app))["run-id"])
    log = _finish(cli, run_id)
    assert marker.read_text().split()[0] == "site-2", marker.read_text()
    assert log.count("ran the foreign code") == 1, log[-4000:]


def test_a_node_declaring_another_sites_name_is_refused_and_named(plane: Cluster):
    proc = plane.spawn(
        "run-impostor", "run", "federation=deploy", f"federation.kit={plane.coordinator}",
        *SMALL, "rounds=1", "run_name=impostor", f"output_dir={plane.root / 'outputs'}",
        f"tracking.uri=sqlite:///{plane.root / 'mlflow.db'}",
    )  # fmt: skip
    assert proc.popen.wait(timeout=1800) == 0, proc.text()[-6000:] + plane.logs()
    history = RunHistory.load(plane.root / "outputs" / "impostor" / "history.json")
    assert set(history.rounds[1].site_train) == set(SITES), history.rounds[1]
    cli = FlowerCli(CoordinatorKit(plane.coordinator))
    run_id = int(proc.text().split("submitted run ")[1].split()[0])
    log = cli.log_text(run_id)
    assert f"authenticated with site {IMPOSTOR}'s key but declared itself 'site-1'" in log, log[
        -6000:
    ]
    # Found by the data-quality query, before any training: never asked again.
    assert f"site {IMPOSTOR} is not asked again in this run" in log, log[-6000:]
    assert IMPOSTOR not in history.rounds[1].site_evaluate
    # The real sites trained with their own keys, warm or cold, and their ledgers verify.
    audit = plane.spawn(
        "audit", "audit", "verify",
        *(str(plane.site_kit(s) / "state" / "ledger.jsonl") for s in SITES),
        "--keys", str(plane.coordinator / "ledger-keys"),
    )  # fmt: skip
    assert audit.popen.wait(timeout=120) == 0, audit.text()
    site1 = next(p for p in plane.procs if p.name == "site-1")
    assert site1.text().count(STARTED) >= 3, site1.text()[-3000:]
    # No site private key anywhere in what the coordinator holds.
    held = [p for p in plane.kits.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]
    assert {p.name for p in held} == {"ca.key", "superlink.key"}, held
