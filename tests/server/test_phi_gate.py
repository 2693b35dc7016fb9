"""Nothing a site sends carries PHI; the coordinator shows the sites' data quality first."""

from __future__ import annotations

import json
import shutil
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


INJECTED = {
    "ImageComments": "Pt. Jane Doe, MRN 4471-22",
    "InstitutionName": "St. Elsewhere General",
    "OperatorsName": "WHITE^WALTER",
}


def _inject(series: Path, count: int) -> list[str]:
    """Put identifying data back into `count` files of a series, as archives have it."""
    for path in sorted(p for p in series.glob("*.dcm") if p.name != "seg.dcm")[:count]:
        ds = pydicom.dcmread(path)
        for keyword, value in INJECTED.items():
            setattr(ds, keyword, value)
        block = ds.private_block(0x0009, "HOSPITAL PACS", create=True)
        block.add_new(0x10, "LO", "DOE^JANE 1962")
        ds.save_as(path)
    return [*INJECTED.values(), "DOE^JANE 1962"]


def test_every_message_a_site_sends_is_free_of_phi(tmp_path, consortium):
    root = tmp_path / "data"
    shutil.copytree(consortium[0], root)
    states = tmp_path / "site-state"
    # site-1 leaves out its series with identifying data put back, and trains on the rest.
    injected = _inject(sorted(p for p in (root / "site-1").iterdir() if p.is_dir())[0], 3)
    DataPolicy(require_deidentified=True).save(states / "site-1")
    # site-3's policy refuses the round for one such file, naming it only locally.
    _inject(sorted(p for p in (root / "site-3").iterdir() if p.is_dir())[1], 1)
    DataPolicy(require_deidentified=True, on_phi="refuse").save(states / "site-3")
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
    assert len(identifiers) > 100 and set(injected) <= identifiers
    leaked = sorted(v for v in identifiers if v in coordinator)
    assert leaked == []

    # The refusal says why with counts only; the site's own log names the files.
    refusals = [
        m["configs"]["status"]["refused"] for m in sent if m["configs"]["status"]["refused"]
    ]
    assert refusals and all("site-3" in r and "de-identified" in r for r in refusals)
    assert "1 files are not (the site's log names them)" in refusals[0]

    # The coordinator showed the other sites' data quality before training.
    quality = json.loads((out / "data_quality.json").read_text())
    assert set(quality) == {"site-1", "site-2"}
    # The coordinator hears how many files site-1 left out, never which or why in detail.
    assert quality["site-1"]["series"] == 2 and quality["site-1"]["quarantined_files"] == 13
    assert quality["site-2"]["series"] == 3 and quality["site-2"]["vendors"] == {
        "GE MEDICAL SYSTEMS": 3
    }
    assert abs(sum(quality["site-1"]["intensity_fraction"]) - 1.0) < 1e-3
    assert "data quality by site, before training" in proc.stderr + proc.stdout
    assert (out / "data_quality.png").stat().st_size > 0
    assert client.get_metric_history(run.info.run_id, "data/site-2/series")[0].value == 3
