"""Malformed updates from real ClientApps are rejected, logged and never aggregated;
crashed and late sites are left out without blocking the round."""

from __future__ import annotations

import time

import torch

from server.loop import RunHistory
from tests.conftest import TINY_RUN, run_sites_module

BAD = ["keys-1", "shape-1", "dtype-1", "nan-1", "inf-1", "norm-1"]
GOOD = ["good-1", "good-2", "good-3"]
GONE = ["crash-1"]


def _run_faulty(tmp_path, root, sites, *extra):
    """Run the faulty consortium; `good-N` sites read site-N's data, the others site-1's."""
    data = tmp_path / "data"
    data.mkdir()
    for name in sites:
        source = f"site-{name.split('-')[1]}" if name.startswith("good-") else "site-1"
        (data / name).symlink_to(root / source, target_is_directory=True)
    overrides = [
        "rounds=1",
        *TINY_RUN,
        "privacy=none",
        f"data.root={data}",
        f"federation.num_sites={len(sites)}",
        f"federation.site_names=[{','.join(sites)}]",
        "federation.min_sites=2",
        "run_name=faulty",
        f"output_dir={tmp_path / 'outputs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        *extra,
    ]
    return run_sites_module("faulty_sites", tmp_path / "sent", overrides, cwd=tmp_path)


def test_each_kind_of_bad_update_is_rejected_and_never_aggregated(tmp_path, consortium):
    root, _ = consortium
    proc = _run_faulty(tmp_path, root, GOOD + BAD + GONE)
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
        "crash-1": "site process failed: ",
    }
    for site, fragment in expected.items():
        assert fragment in failures[site]
        assert f"[round 1] site {site} left out: " in proc.stderr
    assert "lost its GPU" in failures["crash-1"]
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


def test_a_late_site_does_not_block_the_round(tmp_path, consortium):
    root, _ = consortium
    started = time.monotonic()
    proc = _run_faulty(
        tmp_path, root, ["good-1", "good-2", "slow-1"], "federation.round_timeout=25"
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    history = RunHistory.load(tmp_path / "outputs" / "faulty" / "history.json")
    assert set(history.rounds[1].site_train) == {"good-1", "good-2"}
    assert history.rounds[1].failures["slow-1"] == "no reply within federation.round_timeout"
    # It answers after 40 s: the round closed at the 25 s timeout without it.
    assert time.monotonic() - started < 300
