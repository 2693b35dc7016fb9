"""The one signed-log format behind the privacy ledger and the governance audit log."""

import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.governance import AuditLog
from federation.ledger import Ledger, Mechanism, read_ledger, verify_ledger
from federation.signedlog import SignedLog, chain_problems, read_records, site_keys

# Written by the two separate implementations at b038b82, before they became one module,
# with the key below: sites' existing files must keep verifying.
DATA = Path(__file__).parent / "data"
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


@pytest.fixture
def old_logs(tmp_path: Path) -> Path:
    for name in ("audit-b038b82.jsonl", "ledger-b038b82.jsonl"):
        shutil.copy(DATA / name, tmp_path / name)
    return tmp_path


def test_files_written_before_the_merge_verify_and_their_chains_continue(old_logs: Path) -> None:
    keys = {"site-1": KEY.public_key()}
    audit = AuditLog(old_logs / "audit-b038b82.jsonl", KEY, "site-1")
    ledger = Ledger(old_logs / "ledger-b038b82.jsonl", KEY, "site-1")
    assert audit.verify(KEY.public_key()) == []
    assert verify_ledger(ledger.entries(), keys) == []
    assert [e.secure_aggregation for e in ledger.entries()] == ["", "secaggplus"]

    audit.append("revoked", plan="p1", by="Dr. B", reason="superseded")
    mechanism = Mechanism(0.1, 1.1, 1.0, 10, 1e-5)
    ledger.append(
        run="r2", server_round=1, dataset="ds", plan="p2", mechanism=mechanism,
        accountant="rdp", budget=10, grad_sample_mode="hooks",
    )  # fmt: skip
    assert audit.verify(KEY.public_key()) == []
    assert verify_ledger(read_ledger(ledger.path), keys) == []
    assert [e["index"] for e in audit.entries()] == [0, 1, 2]
    assert read_ledger(ledger.path)[-1].prev_hash == read_ledger(ledger.path)[1].hash


def test_one_check_finds_edits_and_reordering_in_either_log(old_logs: Path) -> None:
    keys = {"site-1": KEY.public_key()}
    for name in ("audit-b038b82.jsonl", "ledger-b038b82.jsonl"):
        path = old_logs / name
        first, second = path.read_text().splitlines()
        edited = json.loads(second) | {"time": "2020-01-01T00:00:00+00:00"}
        path.write_text(first + "\n" + json.dumps(edited) + "\n")
        problems = chain_problems(read_records(path), site_keys(keys), source=name)
        assert problems == [
            f"{name}: entry 1: content does not match its hash: the entry was edited"
        ]
        path.write_text(second + "\n" + first + "\n")
        problems = chain_problems(read_records(path), site_keys(keys), source=name)
        assert sum("removed, inserted or reordered" in p for p in problems) == 4


def test_a_log_opened_without_its_key_is_read_only(old_logs: Path) -> None:
    log = SignedLog(old_logs / "audit-b038b82.jsonl", None)
    assert len(log.records()) == 2
    with pytest.raises(ValueError, match="read only"):
        log.append(lambda records: {"site": "site-1"})
    assert len(log.records()) == 2


def test_a_failing_builder_appends_nothing(tmp_path: Path) -> None:
    log = SignedLog(tmp_path / "log.jsonl", KEY)
    log.append(lambda records: {"site": "site-1", "n": len(records)})

    def refuse(records: list[dict[str, object]]) -> dict[str, object]:
        raise RuntimeError("over budget")

    with pytest.raises(RuntimeError, match="over budget"):
        log.append(refuse)
    assert [r["n"] for r in log.records()] == [0]
    assert chain_problems(log.records(), lambda _: KEY.public_key(), source="log") == []
