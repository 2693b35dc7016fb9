"""A model's life across runs: start from a registered model, evaluate one at every site."""

import dataclasses

import pytest
import torch

from client.state import SiteState
from federation.config import MedfedConfig, ModelConfig
from federation.modelpack import PACKAGE_FILE, ModelPackage
from federation.models import build_model
from server.loop import INIT_TAG, RunHistory, initial_arrays
from tests.helpers import medfed_cli, medfed_evaluate, medfed_run, mlflow_run

REGISTERED = "models:/medfed-seg2d/1"


def _ledgers(tmp_path):
    return {p: p.read_bytes() for p in sorted((tmp_path / "site-state").glob("*/ledger.jsonl"))}


def _table(stdout):
    """`medfed evaluate`'s table: site -> {column: cell} (the reason may hold spaces)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Evaluation of ")) + 1
    header = lines[start].split()
    rows = {}
    for line in lines[start + 1 :]:
        cells = line.split(maxsplit=len(header) - 1)
        rows[cells[0]] = dict(zip(header, cells, strict=False))
    return rows


def test_start_from_a_registered_model_then_evaluate_it_at_every_site(tmp_path, consortium):
    root, _ = consortium
    base = medfed_run(tmp_path, root, "run_name=base", "rounds=1")
    assert base.returncode == 0, base.stderr[-4000:]
    package = ModelPackage.load(tmp_path / "outputs" / "base" / PACKAGE_FILE)
    reported = RunHistory.load(tmp_path / "outputs" / "base" / "history.json").rounds[
        package.card.round
    ]

    # A run started from version 1: its round 0 is version 1, as the base run measured it.
    warm = medfed_run(tmp_path, root, "run_name=warm", "rounds=1", f"model.init={REGISTERED}")
    assert warm.returncode == 0, warm.stderr[-4000:]
    history = RunHistory.load(tmp_path / "outputs" / "warm" / "history.json")
    assert history.started_from == REGISTERED
    for site, metrics in reported.site_evaluate.items():
        assert history.rounds[0].site_evaluate[site]["dice"] == pytest.approx(
            metrics["dice"], abs=1e-6
        )
    client, run = mlflow_run(tmp_path, "warm")
    assert run.data.tags[INIT_TAG] == REGISTERED
    assert client.get_model_version("medfed-seg2d", "2").tags[INIT_TAG] == REGISTERED

    # Evaluation only, under the sites' governance: site-2 releases metrics only on more
    # examples than it has, site-3 evaluates only a model it approved.
    state = tmp_path / "site-state"
    policy = ["site", "policy", "--state"]
    for site, limit in (
        ("site-2", ["--min-eval-examples", "100000"]),
        ("site-3", ["--require-evaluation-approval"]),
    ):
        assert medfed_cli(tmp_path, *policy, str(state / site), *limit).returncode == 0
    spent = _ledgers(tmp_path)
    assert len(spent) == 3
    first = medfed_evaluate(tmp_path, root, REGISTERED, "run_name=eval-1")
    assert first.returncode == 0, first.stderr[-4000:]
    assert "no privacy budget spent" in first.stdout
    table = _table(first.stdout)
    assert set(table) == {"site-1", "site-2", "site-3", "all"}
    assert float(table["site-1"]["dice"]) == pytest.approx(
        reported.site_evaluate["site-1"]["dice"], abs=1e-4
    )
    assert "under the site's min_eval_examples=100000" in table["site-2"]["refused"]
    assert "is not approved at this site" in table["site-3"]["refused"]
    client, run = mlflow_run(tmp_path, "eval-1")
    assert "evaluation.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert len(client.search_model_versions("name='medfed-seg2d'")) == 2  # nothing new
    assert _ledgers(tmp_path) == spent

    # site-3 reviews the evaluation plan, which names the model and its weights' digest.
    plans = SiteState(state / "site-3", "site-3").plans
    (pending,) = [p for p, row in plans.statuses().items() if row["status"] == "pending"]
    shown = medfed_cli(tmp_path, "site", "plans", "show", pending, "--state", str(state / "site-3"))
    assert REGISTERED in shown.stdout and "weights-sha256" in shown.stdout
    approve = ["site", "plans", "approve", pending, "--state", str(state / "site-3")]
    assert medfed_cli(tmp_path, *approve, "--by", "dr-lee").returncode == 0
    second = medfed_evaluate(tmp_path, root, REGISTERED, "--all-data", "run_name=eval-2")
    assert second.returncode == 0, second.stderr[-4000:]
    again = _table(second.stdout)
    assert float(again["site-3"]["dice"]) > 0 and again["site-3"]["refused"] == "-"
    # all of site-1's labelled series, not only its held-out patients
    assert int(again["site-1"]["examples"]) > int(table["site-1"]["examples"])
    assert _ledgers(tmp_path) == spent


def test_model_init_must_fit_and_fedbn_keeps_its_norm_layers_local(tmp_path):
    full = build_model(ModelConfig(), seed=5).state_dict()
    torch.save(full, tmp_path / "full.pt")
    torch.save(
        build_model(ModelConfig(channels=[4, 8, 16, 32])).state_dict(), tmp_path / "small.pt"
    )

    def config(init, **strategy):
        cfg = MedfedConfig(output_dir=str(tmp_path))
        return dataclasses.replace(
            cfg,
            model=dataclasses.replace(cfg.model, init=str(tmp_path / init)),
            strategy=dataclasses.replace(cfg.strategy, **strategy),
        )

    arrays, source = initial_arrays(config("full.pt"))
    assert source == f"file {tmp_path / 'full.pt'}"
    assert all(torch.equal(arrays.to_torch_state_dict()[k], v) for k, v in full.items())
    with pytest.raises(ValueError, match=r"does not fit the configured model: layers of another"):
        initial_arrays(config("small.pt"))
    arrays, _ = initial_arrays(config("full.pt", name="fedbn", local_norm=True))
    sent = arrays.to_torch_state_dict()
    assert sent and not any(".adn.N." in k for k in sent)  # norm layers stay at each site
    assert all(torch.equal(sent[k], full[k]) for k in sent)
