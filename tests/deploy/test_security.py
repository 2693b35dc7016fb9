"""Who may connect to the SuperLink: TLS with the consortium CA, registered keys only."""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client.supernode import EXIT_NOT_REGISTERED
from tests.conftest import SITES
from tests.deploy.conftest import (
    Cluster,
    kill_tree,
    make_consortium,
    medfed_env,
    teardown_on_sigterm,
)


@pytest.fixture(scope="module")
def link(tmp_path_factory: pytest.TempPathFactory, consortium) -> Iterator[Cluster]:
    """A SuperLink with TLS and node authentication; no site connected yet."""
    data, _ = consortium
    made = make_consortium(tmp_path_factory.mktemp("secure"), data, list(SITES))
    with teardown_on_sigterm(), contextlib.ExitStack() as stack:
        stack.callback(made.stop_all)
        made.start_superlink()
        yield made


def _never_online(link: Cluster, proc, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert link.online() == 0, proc.text()[-3000:]
        time.sleep(1)


def test_unregistered_key_is_rejected(link: Cluster, tmp_path):
    rogue = tmp_path / "rogue"
    shutil.copytree(link.site_kit("site-2"), rogue)
    (rogue / "supernode.key").unlink()
    key = ec.generate_private_key(ec.SECP384R1())
    (rogue / "supernode.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    (rogue / "supernode.key").chmod(0o600)
    proc = link.start_site("site-2", kit=rogue)
    try:
        code = proc.popen.wait(timeout=90)
    finally:
        kill_tree(proc.popen)
    assert code == EXIT_NOT_REGISTERED, proc.text()[-3000:]
    assert "rejected this site's key" in proc.text(), proc.text()[-3000:]


def test_site_trusting_another_ca_cannot_connect(link: Cluster, tmp_path, consortium):
    data, _ = consortium
    other = make_consortium(tmp_path / "other", data, ["site-1"], name="other")
    kit = other.site_kit("site-1")
    # The SuperLink's certificate does not verify against the other consortium's CA.
    context = ssl.create_default_context(cafile=str(kit / "ca.pem"))
    with (
        pytest.raises(ssl.SSLCertVerificationError),
        socket.create_connection(("127.0.0.1", link.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1"),
    ):
        pass
    proc = link.start_site("site-1", "--superlink", f"127.0.0.1:{link.port}", kit=kit)
    try:
        _never_online(link, proc, 10)
    finally:
        kill_tree(proc.popen)


def test_plain_connection_is_refused(link: Cluster):
    # A plain HTTP request, even for the Fleet API, is turned away by the TLS-only gate
    # (nginx says why) and never reaches Flower.
    with socket.create_connection(("127.0.0.1", link.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        try:
            answer = sock.recv(1024)
        except (ConnectionResetError, TimeoutError):
            answer = b""
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert b"plain HTTP request was sent to HTTPS port" in answer, answer
    # A SuperNode with a registered key but without TLS never gets in.
    kit = link.site_kit("site-3")
    log = link.root / "logs" / "insecure.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [
                sys.executable, "-m", "client.supernode", "--insecure",
                "--superlink", f"127.0.0.1:{link.port}",
                "--auth-supernode-private-key", str(kit / "supernode.key"),
                "--node-config", f'site-name="site-3" data-path="{link.data / "site-3"}"',
                "--port", str(_free()),
            ],
            stdout=out, stderr=subprocess.STDOUT, env=medfed_env(), start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert link.online() == 0, log.read_text()[-3000:]
            time.sleep(1)
    finally:
        kill_tree(popen)
    assert "SuperNode ID" not in log.read_text(), log.read_text()[-3000:]


def test_revoked_site_can_no_longer_connect(link: Cluster):
    proc = link.spawn(
        "revoke", "provision", str(link.description), "--output", str(link.kits),
        "--revoke", "site-3",
    )  # fmt: skip
    assert proc.popen.wait(timeout=120) == 0, proc.text()
    assert "unregistered from the running SuperLink" in proc.text(), proc.text()
    site = link.start_site("site-3")
    try:
        code = site.popen.wait(timeout=90)
    finally:
        kill_tree(site.popen)
    assert code == EXIT_NOT_REGISTERED, site.text()[-3000:]


def _free() -> int:
    from client.supernode import free_port

    return free_port()
