"""Nothing a site sends carries PHI; the coordinator shows the sites' data quality first."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
from mlflow.tracking import MlflowClient

from client.prepare import DataPolicy
from federation.dicom.phi import identifying_values
from tests.conftest import TINY_RUN, run_sites_module


def _identifiers(root: Path) -> set[str]:
    """Every patient name, ID, birth date, accession, date, UID and institution."""
    values: set[str] = set()
    for path in root.rglob("*.dcm"):
        values |= identifying_values(pydicom.dcmread(path, stop_before_pixels=True))
    return values


def test_every_message_a_site_sends_is_free_of_phi(tmp_path, consortium):
    root, _ = consortium
    # site-3's policy requires de-identified data: it refuses, naming files only locally.
    DataPolicy(require_deidentified=True).save(tmp_path / "site-state" / "site-3")
    overrides = [
        "rounds=1",
        *TINY_RUN,
        "run_name=phi",
        f"data.root={root}",
        f"output_dir={tmp_path / 'outputs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    proc = run_sites_module("phi_sites", tmp_path / "sent", overrides, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = (tmp_path / "sent" / "sent.jsonl").read_text().splitlines()
    sent = [json.loads(line) for line in lines]
    assert {m["type"] for m in sent} == {"query", "train", "evaluate"}
    out = tmp_path / "outputs" / "phi"
    # What reached the coordinator: messages, its outputs and its MLflow run.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("medfed").experiment_id])
    coordinator = "\n".join(
        [
            *lines,
            *(p.read_text() for p in out.rglob("*.json")),
            json.dumps(run.data.params),
            json.dumps(run.data.metrics),
            json.dumps(run.data.tags),
        ]
    )
    identifiers = _identifiers(root)
    assert len(identifiers) > 100
    leaked = sorted(v for v in identifiers if v in coordinator)
    assert leaked == []

    # The refusal says why with counts only; the site's own log names the files.
    refusals = [
        m["configs"]["status"]["refused"] for m in sent if m["configs"]["status"]["refused"]
    ]
    assert refusals and all("site-3" in r and "de-identified" in r for r in refusals)
    assert "52 files are not (the site's log names them)" in refusals[0]  # 4 patients x 13

    # The coordinator showed the other sites' data quality before training.
    quality = json.loads((out / "data_quality.json").read_text())
    assert set(quality) == {"site-1", "site-2"}
    assert quality["site-1"]["series"] == 3 and quality["site-2"]["vendors"] == {
        "GE MEDICAL SYSTEMS": 3
    }
    assert abs(sum(quality["site-1"]["intensity_fraction"]) - 1.0) < 1e-3
    assert "data quality by site, before training" in proc.stderr + proc.stdout
    assert (out / "data_quality.png").stat().st_size > 0
    assert client.get_metric_history(run.info.run_id, "data/site-2/series")[0].value == 3
