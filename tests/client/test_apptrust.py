"""The site's app trust: its own release, approved apps, refusals in the signed audit log."""

from __future__ import annotations

import io
import zipfile

import pytest
from flwr.cli.build import build_fab_from_disk

from client.apptrust import RELEASE, AppGate, UntrustedApp, is_release_fab, running_app
from client.governance import AuditLog
from federation.appdigest import app_digest, release_digest
from federation.security import load_public_key
from tests.conftest import REPO


def _zip(files: dict[str, bytes], method: int) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", method) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return out.getvalue()


def test_the_digest_names_the_code_not_the_compression():
    files = {"pyproject.toml": b"[project]\n", "app/client.py": b"print('x')\n"}
    stored, deflated = _zip(files, zipfile.ZIP_STORED), _zip(files, zipfile.ZIP_DEFLATED)
    assert stored != deflated and app_digest(stored) == app_digest(deflated)
    changed = _zip({**files, "app/client.py": b"print('y')\n"}, zipfile.ZIP_DEFLATED)
    assert app_digest(changed) != app_digest(deflated)
    with pytest.raises(ValueError, match="not a Flower app bundle"):
        app_digest(b"not a zip")


def test_the_release_digest_is_the_fab_medfed_run_submits(tmp_path):
    # `medfed run` bundles a copy of the app's files (Flower walks all of a checkout).
    from server.deploy import _stage_app

    staged = _stage_app(tmp_path / "app")
    assert not (staged / ".venv").exists()
    assert release_digest() == app_digest(build_fab_from_disk(staged))
    assert release_digest() == app_digest(build_fab_from_disk(REPO))


def test_the_gate_admits_the_release_refuses_others_and_obeys_approvals(tmp_path):
    gate = AppGate(tmp_path / "state", "site-1")
    release = build_fab_from_disk(REPO)
    assert gate.admit(release, "fab-r", 7) == release_digest()
    assert running_app(tmp_path / "state", 7) == release_digest()
    assert is_release_fab(tmp_path / "state", "fab-r")
    foreign = _zip({"pyproject.toml": b"[project]\nname='x'\n"}, zipfile.ZIP_DEFLATED)
    digest = app_digest(foreign)
    for _ in range(2):  # every message of the run is refused; one audit entry per run
        with pytest.raises(UntrustedApp, match=f"its app {digest}"):
            gate.admit(foreign, "fab-f", 8)
    assert [e["details"]["run"] for e in gate.refusals()] == [8]
    assert not (tmp_path / "state" / "apps" / "runs" / "8.json").exists()
    with pytest.raises(ValueError, match="not approved"):
        gate.revoke(digest[:16], by="Dr. Ada")
    gate.approve(digest[:16], by="Dr. Ada", note="reviewed")
    assert gate.trusted()[digest].startswith("approved by Dr. Ada")
    assert gate.trusted()[str(release_digest())] == RELEASE
    assert gate.admit(foreign, "fab-f", 9) == digest
    assert not is_release_fab(tmp_path / "state", "fab-f")  # cold ClientApps for it
    gate.revoke(digest, by="Dr. Ada", reason="withdrawn")
    with pytest.raises(UntrustedApp):
        gate.admit(foreign, "fab-f", 10)
    with pytest.raises(ValueError, match="not an app digest"):
        gate.approve("xyz", by="Dr. Ada")
    log = AuditLog(tmp_path / "state" / "audit.jsonl", None, "site-1")  # type: ignore[arg-type]
    assert log.verify(load_public_key(tmp_path / "state" / "site_key.pub")) == []
    actions = [e["action"] for e in log.entries()]
    assert actions == ["app-refused", "app-approved", "app-revoked", "app-refused"]
