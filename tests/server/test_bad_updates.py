"""Malformed updates from real ClientApps are rejected, logged and never aggregated."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from server.loop import RunHistory
from tests.conftest import SEED

BAD = ["keys-1", "shape-1", "dtype-1", "nan-1", "inf-1", "norm-1"]
GOOD = ["good-1", "good-2", "good-3"]


def test_each_kind_of_bad_update_is_rejected_and_never_aggregated(tmp_path, consortium):
    root, _ = consortium
    data = tmp_path / "data"
    data.mkdir()
    for i, name in enumerate(GOOD):
        (data / name).symlink_to(root / f"site-{i + 1}", target_is_directory=True)
    for name in BAD:
        (data / name).symlink_to(root / "site-1", target_is_directory=True)
    sites = GOOD + BAD
    overrides = [
        "rounds=1",
        "task.image_size=32",
        "task.local_epochs=1",
        "task.batch_size=8",
        "privacy=none",
        "data.generate=false",
        f"seed={SEED}",
        f"data.root={data}",
        f"federation.num_sites={len(sites)}",
        f"federation.site_names=[{','.join(sites)}]",
        "federation.min_sites=2",
        "run_name=faulty",
        f"output_dir={tmp_path / 'outputs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "tests.server.faulty_sites", str(tmp_path / "sent"), *overrides],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    history = RunHistory.load(tmp_path / "outputs" / "faulty" / "history.json")
    failures = history.rounds[1].failures
    expected = {
        "keys-1": "wrong keys",
        "shape-1": "wrong shape",
        "dtype-1": "wrong dtype",
        "nan-1": "non-finite values",
        "inf-1": "non-finite values",
        "norm-1": "median of the other sites",
    }
    for site, fragment in expected.items():
        assert failures[site].startswith("update rejected: ") and fragment in failures[site]
        assert f"[round 1] site {site} left out: update rejected" in proc.stderr
    assert set(history.rounds[1].site_train) == set(GOOD)

    # The global model is exactly the sample-weighted mean of the honest updates.
    final = torch.load(tmp_path / "outputs" / "faulty" / "global_model.pt")
    sent = [torch.load(tmp_path / "sent" / f"{s}.pt") for s in GOOD]
    total = sum(float(s["weight"]) for s in sent)
    for key, value in final.items():
        if not value.is_floating_point():
            continue
        expected_value = sum(s["state"][key].double() * float(s["weight"]) for s in sent) / total
        torch.testing.assert_close(value.double(), expected_value, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(value).all()
