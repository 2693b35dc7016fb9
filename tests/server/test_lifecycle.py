"""A model's life across runs: start from a registered model, evaluate one at every site."""

import dataclasses

import pytest
import torch

from client.state import SiteState
from federation.config import MedfedConfig, ModelConfig
from federation.modelpack import PACKAGE_FILE, ModelPackage
from federation.models import build_model
from server.crosssite import CROSS_SITE_JSON, GLOBAL, CrossSiteMatrix
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
    second = medfed_evaluate(tmp_path, root, REGISTERED, "run_name=eval-2")
    assert second.returncode == 0, second.stderr[-4000:]
    again = _table(second.stdout)
    assert float(again["site-3"]["dice"]) > 0 and again["site-3"]["refused"] == "-"
    # On all their data: site-1 evaluates every labelled series, not only its held-out
    # patients; site-3's approval was for the held-out evaluation, so it asks again.
    third = medfed_evaluate(tmp_path, root, REGISTERED, "run_name=eval-3", flags=("--all-data",))
    assert third.returncode == 0, third.stderr[-4000:]
    everything = _table(third.stdout)
    assert int(everything["site-1"]["examples"]) > int(table["site-1"]["examples"])
    assert "is not approved at this site" in everything["site-3"]["refused"]
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


def test_personalised_models_stay_at_the_sites_and_spend_within_their_budget(tmp_path, consortium):
    root, _ = consortium
    proc = medfed_run(
        tmp_path,
        root,
        "run_name=own",
        "rounds=1",
        "strategy.personalise.local_epochs=1",
        "strategy.personalise.ditto_lambda=0.1",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Personalised" in proc.stdout
    history = RunHistory.load(tmp_path / "outputs" / "own" / "history.json")
    assert set(history.personalised) == {"site-1", "site-2", "site-3"}
    assert history.personalise_failures == {}
    for site, metrics in history.personalised.items():
        assert 0 <= metrics["global-dice"] <= 1 and 0 <= metrics["personal-dice"] <= 1
        # Ditto: each site's own model was evaluated beside the global one every round
        assert 0 <= history.rounds[1].site_evaluate[site]["personal-dice"] <= 1
        state = SiteState(tmp_path / "site-state" / site, site)
        assert state.personal_model("own") is not None  # kept at the site ...
        entries = {e.round: e for e in state.ledger.entries() if e.run == "own"}
        # ... and paid for: round 1 trained the global and the Ditto model (one epoch
        # each), round 2 is the one-epoch fine-tuning, each signed into the ledger.
        assert sorted(entries) == [1, 2]
        assert entries[1].mechanism.steps == 2 * entries[2].mechanism.steps
        assert entries[2].epsilon == pytest.approx(metrics["epsilon"])
        assert entries[1].epsilon < entries[2].epsilon <= entries[2].budget
    # Only metrics came back from the fine-tuning: the coordinator's copy of the ledger
    # holds its entries, and no update of round 2 was received.
    copied = (tmp_path / "outputs" / "own" / "ledger" / "site-1.jsonl").read_text()
    assert '"round": 2' in copied
    assert all(r.round <= 1 for r in history.rounds)


def test_cross_site_matrix_shows_a_site_that_keeps_its_model_and_sends_none_of_it(
    tmp_path, consortium
):
    root, _ = consortium
    state = tmp_path / "site-state"
    for site, share in (("site-1", "--allow"), ("site-2", "--allow"), ("site-3", "--no-allow")):
        policy = ["site", "policy", "--state", str(state / site), "--max-epsilon", "10"]
        assert medfed_cli(tmp_path, *policy, f"{share}-model-sharing").returncode == 0
    proc = medfed_run(tmp_path, root, "run_name=bn", "rounds=1", "strategy=fedbn")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Cross-site validation" in proc.stdout
    out = tmp_path / "outputs" / "bn"
    matrix = CrossSiteMatrix.load(out / CROSS_SITE_JSON)
    history = RunHistory.load(out / "history.json")
    assert set(matrix.scores) == {GLOBAL, "site-1", "site-2"}
    for model, scores in matrix.scores.items():
        assert set(scores) == {"site-1", "site-2", "site-3"}
        assert all(0 <= v <= 1 for v in scores.values())
        assert "DP-SGD" in matrix.privacy[model]
    # A FedBN site's own model on its own data is what the run's round measured.
    for site in ("site-1", "site-2"):
        measured = history.rounds[1].site_evaluate[site]["dice"]
        assert matrix.scores[site][site] == pytest.approx(measured, abs=1e-6)
        assert matrix.scores[GLOBAL][site] == pytest.approx(measured, abs=1e-6)
    assert "allow_model_sharing is off" in matrix.refused["site-3"]
    # site-3 sent a refusal only: far less than one model, which the others sent.
    model_bytes = sum(
        t.numel() * t.element_size() for t in build_model(ModelConfig()).state_dict().values()
    )
    assert matrix.shared_bytes["site-1"] >= model_bytes
    assert matrix.shared_bytes["site-3"] < model_bytes / 20
    shared = [e["action"] for e in SiteState(state / "site-1", "site-1").plans.audit.entries()]
    kept = [e["action"] for e in SiteState(state / "site-3", "site-3").plans.audit.entries()]
    assert "model-shared" in shared and "model-shared" not in kept
    client, run = mlflow_run(tmp_path, "bn")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {CROSS_SITE_JSON, "cross_site.png"} <= artifacts
