"""A coordinator killed mid-run resumes from its checkpoint: no round lost, none charged twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import highdicom as hd
import numpy as np
import psutil
import pytest
import torch

from federation.dicom.prepare import labelled_volumes
from federation.dicom.synth import generate_consortium
from federation.ledger import read_ledger
from federation.modelpack import ModelPackage, load_model
from federation.tasks.metrics import dice
from medfed.cli import main
from server.checkpoint import Checkpoint, restore_strategy_state, strategy_state
from server.guard import SiteGuard
from server.loop import RunHistory
from server.strategy import build_strategy
from tests.helpers import SMALL, medfed_run, mlflow_run

SITES = ("site-1", "site-2", "site-3")


def _ledger_rounds(state_root: Path, site: str) -> list[int]:
    path = state_root / site / "ledger.jsonl"
    return [e.round for e in read_ledger(path)] if path.exists() else []


def _kill_tree(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the coordinator and every process it started (Ray's included), by PID."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.kill()
    proc.wait(timeout=30)  # reaped here, so its exit status is ours to read
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=30)


def test_killed_coordinator_resumes_without_double_charging(tmp_path, consortium):
    root, _ = consortium
    holdout = tmp_path / "holdout"
    generate_consortium(holdout, site_names=["h"], patients_per_site=[2], slices=12, seed=11)
    overrides = [
        "rounds=3",
        "run_name=phoenix",
        "strategy=fedadam",
        f"evaluation.holdout={holdout / 'h'}",
    ]
    args = [
        *SMALL,
        f"data.root={root}",
        f"output_dir={tmp_path / 'outputs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        *overrides,
    ]
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(
        [sys.executable, "-m", "medfed.cli", "run", *args],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    run_dir = tmp_path / "outputs" / "phoenix"
    state_root = tmp_path / "site-state"
    try:
        # Kill once every site has trained (and been charged for) round 2, before the
        # coordinator has checkpointed it: the worst moment to lose the coordinator.
        deadline = time.monotonic() + 600
        while not all(2 in _ledger_rounds(state_root, s) for s in SITES):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "round 2 never trained"
            time.sleep(0.05)
    finally:
        _kill_tree(first)
        log.close()
    assert first.returncode == -signal.SIGKILL
    assert Checkpoint.load(run_dir).round == 1
    charged = {s: _ledger_rounds(state_root, s) for s in SITES}
    assert all(rounds == [1, 2] for rounds in charged.values()), charged

    client, run = mlflow_run(tmp_path, "phoenix")
    assert run.info.status == "RUNNING"  # the dead coordinator never closed it

    # Overrides that would change the run are refused; locating ones are fine.
    def resume(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "medfed.cli", "run", "--resume", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )

    changed = resume("phoenix", f"output_dir={tmp_path / 'outputs'}", "rounds=5")
    assert changed.returncode == 2 and "only output_dir" in changed.stderr
    # By MLflow run id; `--resume phoenix output_dir=...` finds it by name as well.
    resumed = resume(run.info.run_id, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming after round 1 of 3" in resumed.stderr

    # No site was charged twice: round 2 was answered from the stored update.
    for site in SITES:
        assert Counter(_ledger_rounds(state_root, site)) == {1: 1, 2: 1, 3: 1}, site
    coordinator_copy = read_ledger(run_dir / "ledger" / "site-1.jsonl")
    assert [e.round for e in coordinator_copy] == [1, 2, 3]

    history = RunHistory.load(run_dir / "history.json")
    assert [r.round for r in history.rounds] == [0, 1, 2, 3]
    assert all(0 <= r.holdout["dice"] <= 1 for r in history.rounds)

    client, run = mlflow_run(tmp_path, "phoenix")  # still one run of that name
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "holdout/dice"))
    assert steps == [0, 1, 2, 3]

    # The best round's model is registered, with its lineage.
    checkpoint = Checkpoint.load(run_dir)
    (version,) = client.search_model_versions("name='medfed-seg2d'")
    tags = version.tags
    assert version.run_id == run.info.run_id
    assert tags["medfed.best_round"] == str(checkpoint.best_round)
    assert float(tags["medfed.best_dice"]) == pytest.approx(
        max(r.holdout["dice"] for r in history.rounds), abs=1e-6
    )
    assert tags["medfed.strategy"] == "fedadam"
    assert tags["medfed.code_version"].startswith("0.1.0")
    assert len(tags["medfed.config_sha256"]) == 64
    for site in SITES:
        assert tags[f"medfed.site.{site}.dataset"].startswith("ds-")
        last = read_ledger(state_root / site / "ledger.jsonl")[-1]
        assert float(tags[f"medfed.site.{site}.epsilon"]) == pytest.approx(last.epsilon)
    best = torch.load(run_dir / "best_model.pt")
    assert best.keys() == torch.load(run_dir / "global_model.pt").keys()
    _check_registered_model(client, tmp_path, str(version.version), checkpoint, holdout / "h")

    # A new run cannot take over the name of an existing one.
    again = medfed_run(tmp_path, root, *overrides)
    assert again.returncode == 2 and "already exists" in again.stderr


def _check_registered_model(client, tmp_path, version, checkpoint, holdout):
    """The registered model is self-contained: found by version or alias, it segments new
    series at a site as well as the run measured, and MLflow can serve it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    package = load_model(f"models:/medfed-seg2d/{version}", tracking_uri=uri, output_dir=tmp_path)
    assert (package.card.name, package.card.version) == ("medfed-seg2d", version)
    assert (package.card.run, package.card.round) == ("phoenix", checkpoint.best_round)
    best = torch.load(tmp_path / "outputs" / "phoenix" / "best_model.pt")
    assert all(torch.equal(best[k], package.state[k]) for k in best)
    client.set_registered_model_alias("medfed-seg2d", "champion", version)
    by_alias = load_model("models:/medfed-seg2d@champion", tracking_uri=uri, output_dir=tmp_path)
    assert by_alias.card == package.card
    handed_over = tmp_path / "handed-over.medfed.pt"  # the file a coordinator gives a site
    args = ["model", "export", "--model", "models:/medfed-seg2d@champion", "--tracking-uri", uri]
    assert main([*args, "--output", str(handed_over)]) == 0
    assert ModelPackage.load(handed_over).card == package.card

    # The run's hold-out, predicted at a "site": the SEGs' Dice against the ground-truth
    # SEGs is the hold-out Dice the run reported for its best round.
    out = tmp_path / "predicted"
    args = ["site", "predict", "--model", "models:/medfed-seg2d@champion", "--tracking-uri", uri]
    assert main([*args, "--source", str(holdout), "--output", str(out)]) == 0
    results = {
        r["series_uid"]: r for r in json.loads((out / "predictions.json").read_text())["results"]
    }
    volumes, _ = labelled_volumes(holdout, tmp_path / "holdout-cache")
    dices = []
    for volume in volumes:
        seg = hd.seg.segread(results[volume.series_uid]["path"])
        mask = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=volume.sop_uids,
            combine_segments=True,
            assert_missing_frames_are_empty=True,
        )
        dices.append(dice(np.asarray(mask) > 0, volume.label))
    assert float(np.mean(dices)) == pytest.approx(checkpoint.best_value, abs=0.01)

    # An MLflow model too: probabilities for slices preprocessed as the task does.
    import mlflow

    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model(f"models:/medfed-seg2d/{version}")
    assert served.metadata.get_input_schema().inputs[0].shape == (-1, 1, -1, -1)
    probabilities = served.predict(np.zeros((2, 1, 32, 32), dtype=np.float32))
    assert probabilities.shape == (2, 1, 32, 32)
    assert ((0 <= probabilities) & (probabilities <= 1)).all()


def test_strategy_state_survives_a_checkpoint(tmp_path):
    from federation.compose import compose_config

    cfg = compose_config(["strategy=fedadam", "privacy=central"])
    guard = SiteGuard(build_strategy(cfg), min_sites=2, run_name="t")
    optimiser = guard.inner.wrapped  # SiteGuard -> DP wrapper -> FedAdam
    rng = torch.Generator().manual_seed(0)
    moments = {"w": torch.randn(3, 4, generator=rng).double().numpy()}
    optimiser.m_t, optimiser.v_t = moments, {"w": moments["w"] ** 2}
    optimiser.current_arrays = {"w": moments["w"] * 3}
    guard.inner.clipping_norm = 0.37
    Checkpoint(0, {}, strategy_state(guard), {}, "run").save(tmp_path)

    fresh = SiteGuard(build_strategy(cfg), min_sites=2, run_name="t")
    restore_strategy_state(fresh, Checkpoint.load(tmp_path).strategy)
    assert fresh.inner.clipping_norm == pytest.approx(0.37)
    restored = fresh.inner.wrapped
    assert (restored.m_t["w"] == moments["w"]).all()
    assert (restored.v_t["w"] == moments["w"] ** 2).all()
    assert (restored.current_arrays["w"] == moments["w"] * 3).all()

    other = SiteGuard(build_strategy(compose_config([])), min_sites=2, run_name="t")
    with pytest.raises(ValueError, match="differently configured"):
        restore_strategy_state(other, Checkpoint.load(tmp_path).strategy)


def test_resume_needs_a_checkpoint(tmp_path):
    from server.checkpoint import check_run_dir

    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        check_run_dir(tmp_path, resume=True)
    check_run_dir(tmp_path, resume=False)
    assert os.listdir(tmp_path) == []
