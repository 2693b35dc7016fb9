"""Real Flower simulations (Ray backend) of the whole medfed run, through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from federation.config import ModelConfig
from federation.models import build_model, norm_state_keys
from server.loop import RunHistory
from tests.conftest import SEED
from tests.helpers import medfed_run, mlflow_run


def test_three_sites_two_rounds_train_aggregate_and_track(tmp_path, consortium):
    root, _ = consortium
    proc = medfed_run(tmp_path, root, "run_name=happy")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Held-out Dice" in proc.stdout
    assert "dice site-1" in proc.stdout and "eps site-3" in proc.stdout

    out = tmp_path / "outputs" / "happy"
    history = RunHistory.load(out / "history.json")
    assert [r.round for r in history.rounds] == [0, 1, 2]
    for record in history.rounds[1:]:
        # Every site trained; FedAvg's loss is the sample-weighted mean of theirs.
        assert set(record.site_train) == {"site-1", "site-2", "site-3"}
        weights = {s: m["num-examples"] for s, m in record.site_train.items()}
        expected = sum(m["train-loss"] * weights[s] for s, m in record.site_train.items())
        assert record.train["train-loss"] == pytest.approx(expected / sum(weights.values()))
        assert record.train["epsilon"] == pytest.approx(
            max(m["epsilon"] for m in record.site_train.values())
        )
        dice = {s: m["dice"] for s, m in record.site_evaluate.items()}
        assert set(dice) == {"site-1", "site-2", "site-3"}
        assert min(dice.values()) <= record.evaluate["dice"] <= max(dice.values())
    for site in history.sites:
        eps = [r.site_train[site]["epsilon"] for r in history.rounds[1:]]
        assert 0 < eps[0] < eps[1]  # privacy spend accumulates across rounds

    final = torch.load(out / "global_model.pt")
    initial = build_model(ModelConfig(), seed=SEED).state_dict()
    assert final.keys() == initial.keys()
    changed = [k for k in final if not torch.equal(final[k], initial[k])]
    assert len(changed) > len(final) // 2
    assert (out / "rounds.png").stat().st_size > 0

    client, run = mlflow_run(tmp_path, "happy")
    assert run.info.status == "FINISHED"
    assert run.data.params["privacy.noise_multiplier"] == "1.3"
    assert run.data.params["federation.num_sites"] == "3"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "eval/dice")]
    assert sorted(steps) == [0, 1, 2]
    site_eps = client.get_metric_history(run.info.run_id, "site/site-2/epsilon")
    assert sorted(m.step for m in site_eps) == [1, 2]
    assert {m.step: m.value for m in site_eps}[2] == pytest.approx(
        history.rounds[2].site_train["site-2"]["epsilon"]
    )
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"global_model.pt", "history.json", "config.yaml", "rounds.png"} <= artifacts
    # model/ is the registered best model (an MLflow pyfunc), not the final state dict
    model_files = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/MLmodel", "model/artifacts"} <= model_files


def _mixed_root(tmp_path: Path, root: Path) -> Path:
    """site-1 and site-2 are real; `junk` holds no DICOM; `ghost` does not exist."""
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("site-1", "site-2"):
        (mixed / name).symlink_to(root / name, target_is_directory=True)
    (mixed / "junk").mkdir()
    (mixed / "junk" / "export.csv").write_text("patient,label\n")
    return mixed


def test_bad_sites_are_named_and_the_run_goes_on(tmp_path, consortium):
    root, _ = consortium
    mixed = _mixed_root(tmp_path, root)
    proc = medfed_run(
        tmp_path,
        mixed,
        "run_name=partial",
        "federation.num_sites=4",
        "federation.site_names=[site-1,site-2,junk,ghost]",
        "federation.min_sites=2",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    history = RunHistory.load(tmp_path / "outputs" / "partial" / "history.json")
    last = history.rounds[-1]
    assert set(last.site_train) == {"site-1", "site-2"}
    assert "data folder does not exist" in last.failures["ghost"]
    assert str(mixed / "ghost") in last.failures["ghost"]
    assert "no usable labelled series" in last.failures["junk"]
    assert str(mixed / "junk") in last.failures["junk"]
    assert "site 'ghost'" in proc.stderr and "site 'junk'" in proc.stderr
    _, run = mlflow_run(tmp_path, "partial")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["sites/delivered"] == 2


def test_too_few_usable_sites_stop_the_run_with_a_clear_error(tmp_path, consortium):
    root, _ = consortium
    mixed = _mixed_root(tmp_path, root)
    proc = medfed_run(
        tmp_path,
        mixed,
        "run_name=doomed",
        "federation.num_sites=3",
        "federation.site_names=[site-1,junk,ghost]",
        "federation.min_sites=2",
    )
    assert proc.returncode != 0
    message = proc.stderr
    assert "round 1: only 1 site(s) delivered an update, federation.min_sites=2" in message
    assert "ghost" in message and "junk" in message
    _, run = mlflow_run(tmp_path, "doomed")
    assert run.info.status == "FAILED"
    assert "min_sites" in run.data.tags["medfed.error"]


# One of each kind: a proximal term at the sites, a server optimiser with state (FedYogi
# is FedAdam's sibling), a robust aggregate (FedMedian is Krum's); all build in test_strategy.
@pytest.mark.parametrize("strategy", ["fedprox", "fedadam", "krum"])
def test_each_kind_of_strategy_runs_federated_rounds(tmp_path, consortium, strategy):
    root, _ = consortium
    # Two rounds: the second trains on the first's aggregate (FedAdam computes in float64).
    proc = medfed_run(tmp_path, root, f"run_name={strategy}", f"strategy={strategy}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    history = RunHistory.load(tmp_path / "outputs" / strategy / "history.json")
    assert set(history.rounds[2].site_train) == {"site-1", "site-2", "site-3"}
    final = torch.load(tmp_path / "outputs" / strategy / "global_model.pt")
    assert all(
        final[k].dtype == v.dtype for k, v in build_model(ModelConfig()).state_dict().items()
    )
    initial = build_model(ModelConfig(), seed=SEED).state_dict()
    assert any(not torch.equal(final[k], initial[k]) for k in final)
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
    _, run = mlflow_run(tmp_path, strategy)
    assert run.data.params["strategy.name"] == strategy


def test_fedbn_keeps_norm_layers_at_the_sites_with_fp16_updates(tmp_path, consortium):
    root, _ = consortium
    proc = medfed_run(
        tmp_path, root, "run_name=fedbn", "strategy=fedbn", "federation.update_encoding=fp16-delta"
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    model = build_model(ModelConfig(), seed=SEED)
    norm_keys = norm_state_keys(model)
    assert norm_keys  # the default model has learnable norm layers
    initial = model.state_dict()

    # The coordinator never holds (so never averages) a norm layer.
    final = torch.load(tmp_path / "outputs" / "fedbn" / "global_model.pt")
    assert set(final) == set(initial) - norm_keys
    assert any(not torch.equal(final[k], initial[k]) for k in final)
    # What each site released lacks them too; each site kept and trained its own.
    own = {}
    for site in ("site-1", "site-2", "site-3"):
        state = tmp_path / "site-state" / site
        (released,) = (state / "replies").glob("*.pt")
        assert not norm_keys & set(torch.load(released)["state_dict"])
        (kept,) = (state / "local-layers").glob("*.pt")
        own[site] = torch.load(kept)
        assert set(own[site]) == norm_keys
    for key in norm_keys:
        values = [own[s][key] for s in own]
        assert not torch.equal(values[0], initial[key])
        assert not torch.equal(values[0], values[1]) and not torch.equal(values[1], values[2])
    history = RunHistory.load(tmp_path / "outputs" / "fedbn" / "history.json")
    assert set(history.rounds[2].site_evaluate) == {"site-1", "site-2", "site-3"}
    # Each site sent fp16 deltas of the shared layers: about half their float32 size.
    float32_bytes = 4 * sum(v.numel() for k, v in initial.items() if k not in norm_keys)
    sent = history.rounds[2].update_bytes
    assert set(sent) == set(own)
    assert all(0.5 < b / float32_bytes < 0.55 for b in sent.values()), sent


def test_all_sites_failing_stops_the_run_instead_of_hanging(tmp_path, consortium):
    root, _ = consortium
    mixed = _mixed_root(tmp_path, root)
    proc = medfed_run(
        tmp_path,
        mixed,
        "run_name=allfail",
        "federation.num_sites=2",
        "federation.site_names=[junk,ghost]",
        "federation.min_sites=1",
    )
    assert proc.returncode == 2
    assert "round 1: only 0 site(s) delivered an update" in proc.stderr
    assert "ghost: " in proc.stderr and "junk: " in proc.stderr
    _, run = mlflow_run(tmp_path, "allfail")
    assert run.info.status == "FAILED"
