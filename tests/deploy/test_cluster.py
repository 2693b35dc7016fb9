"""SuperLink + 3 SuperNodes over TLS with node authentication, on loopback."""

from __future__ import annotations

import json
import signal
import time

from mlflow.tracking import MlflowClient

from client.console import create_site_console
from client.superexec import CLIENTAPP_NICE, STARTED
from medfed.cli import main as medfed
from server.console import create_server_console
from server.loop import RunHistory
from tests.conftest import SITES
from tests.console_browser import browser, screenshot, serving, sign_in  # noqa: F401
from tests.deploy.conftest import Cluster, kill_tree
from tests.helpers import SMALL


def launch(cluster: Cluster, name: str, *overrides: str) -> tuple[object, list[str]]:
    args = [
        "run",
        "federation=deploy",
        f"federation.kit={cluster.coordinator}",
        *SMALL,
        f"run_name={name}",
        f"output_dir={cluster.root / 'outputs'}",
        f"tracking.uri=sqlite:///{cluster.root / 'mlflow.db'}",
        *overrides,
    ]
    return cluster.spawn(f"run-{name}", *args), args


def finish(proc, timeout: float = 1800) -> str:
    try:
        proc.popen.wait(timeout=timeout)
    except Exception as err:
        raise AssertionError(f"{proc.name} did not finish:\n{proc.text()[-5000:]}") from err
    return proc.text()


def test_three_sites_complete_rounds_over_tls_and_mlflow_holds_them(cluster: Cluster):
    proc, _ = launch(cluster, "tls")
    out = finish(proc)
    assert proc.popen.returncode == 0, out[-6000:] + cluster.logs()
    assert "finished:completed" in out
    # The coordinator's round lines reach the launcher through the run's log stream.
    assert "[run tls] [round 1/2] 3 sites trained" in out, out[-3000:]
    assert "[run tls] [round 2/2] 3 sites trained" in out, out[-3000:]
    history = RunHistory.load(cluster.root / "outputs" / "tls" / "history.json")
    assert [r.round for r in history.rounds] == [0, 1, 2]
    for record in history.rounds[1:]:
        assert set(record.site_train) == set(SITES), record
        assert set(record.site_evaluate) == set(SITES), record
        assert 0 < record.train["epsilon"]
    seconds = [r.seconds for r in history.rounds[1:]]
    print(json.dumps({"deploy_round_seconds": seconds}))
    # A waiting site's poll is held at the SuperLink until its next message comes
    # (flowerpatch.held_fleet_polls): a few polls per message, not one every half second.
    access = (cluster.coordinator / "superlink-home" / "gate-access.log").read_text()
    polls = [float(line.split()[-1]) for line in access.splitlines() if "pull-messages" in line]
    messages = access.count("/v1/fleet/push-messages")
    assert max(polls) >= 1.0 and len(polls) <= 6 * messages, (len(polls), messages)
    # Every message (a query, then train and evaluate per round) ran in a warm ClientApp,
    # the run's messages at a site one after another in one process.
    for site in cluster.procs:
        if site.name in SITES:
            started = [line for line in site.text().splitlines() if STARTED in line]
            assert len(started) >= 1 + 2 * 2, site.text()[-3000:]
            processes = {line.rpartition("process ")[2] for line in started}
            assert len(processes) < len(started), started
            # Training yields the CPU to the site's SuperNode (client.superexec).
            assert all(f"niceness {CLIENTAPP_NICE}," in line for line in started), started

    client = MlflowClient(f"sqlite:///{cluster.root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("medfed")
    (run,) = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'tls'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["medfed.engine"] == "deployment"
    assert all(site in run.data.params["federation.site_names"] for site in SITES)
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval/dice"))
    assert steps == [0, 1, 2]
    for site in SITES:
        eps = client.get_metric_history(run.info.run_id, f"site/{site}/epsilon")
        assert sorted(m.step for m in eps) == [1, 2]
    # Each site's ledger, kept in its own kit's state folder, holds the two rounds.
    for site in SITES:
        ledger = cluster.site_kit(site) / "state" / "ledger.jsonl"
        rows = [json.loads(line) for line in ledger.read_text().splitlines()]
        assert [(r["run"], r["round"]) for r in rows if r["run"] == "tls"] == [
            ("tls", 1),
            ("tls", 2),
        ]


def test_evaluate_in_deployment_scores_a_model_at_every_site_and_spends_nothing(
    cluster: Cluster,
):
    # The model the TLS run packaged, evaluated over the same SuperLink and SuperNodes.
    model = cluster.root / "outputs" / "tls" / "model.medfed.pt"
    assert model.exists(), "runs after test_three_sites_complete_rounds_over_tls..."
    ledgers = {s: cluster.site_kit(s) / "state" / "ledger.jsonl" for s in SITES}
    before = {s: p.read_bytes() for s, p in ledgers.items()}
    proc = cluster.spawn(
        "evaluate",
        "evaluate",
        "--model",
        str(model),
        "federation=deploy",
        f"federation.kit={cluster.coordinator}",
        "run_name=tls-evaluated",
        f"output_dir={cluster.root / 'outputs'}",
        f"tracking.uri=sqlite:///{cluster.root / 'mlflow.db'}",
    )
    out = finish(proc)
    assert proc.popen.returncode == 0, out[-6000:] + cluster.logs()
    assert "no training, no privacy budget spent" in out, out[-3000:]
    history = RunHistory.load(cluster.root / "outputs" / "tls-evaluated" / "history.json")
    assert [r.round for r in history.rounds] == [0]
    (record,) = history.rounds
    assert set(record.site_evaluate) == set(SITES) and not record.site_train
    assert history.started_from and history.started_from.startswith(f"file {model} (")
    for site in SITES:
        assert site in out and 0 <= record.site_evaluate[site]["dice"] <= 1
    assert {s: p.read_bytes() for s, p in ledgers.items()} == before


def test_a_failed_serverapp_fails_the_launch_loudly(cluster: Cluster):
    # Every site refuses: its budget's delta is not the run's; the run cannot reach
    # min_sites, the ServerApp raises, and `medfed run` must say so.
    proc, _ = launch(cluster, "doomed", "rounds=1", "privacy.delta=1e-6")
    out = finish(proc)
    assert proc.popen.returncode != 0, out[-4000:]
    assert "finished:failed" in out, out[-4000:]
    assert "min_sites" in out, out[-4000:]


def test_the_consoles_show_sites_runs_and_refusals_in_the_browser(
    cluster: Cluster,
    browser,  # noqa: F811
    tmp_path,
):
    # site-3 refuses this run's noise: its reason reaches the coordinator's page.
    site3 = cluster.site_kit("site-3") / "state"
    limit = ["site", "policy", "--state", str(site3), "--min-noise-multiplier"]
    assert medfed([*limit, "2"]) == 0
    try:
        proc, _ = launch(cluster, "refused", "rounds=1", "federation.min_sites=2")
        out = finish(proc)
        assert proc.popen.returncode == 0, out[-4000:]
    finally:
        assert medfed([*limit, "0"]) == 0
    app, password = create_server_console(
        cluster.coordinator,
        outputs=cluster.root / "outputs",
        tracking_uri=f"sqlite:///{cluster.root / 'mlflow.db'}",
    )
    with serving(app) as url:
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        assert page.request.get(url + "/sites", max_redirects=0).status == 302
        sign_in(page, url, "admin", password)
        rows = [page.inner_text(f"tr:has(td:text-is('{s}'))") for s in SITES]
        assert all("active" in r and "online" in r and "offline" not in r for r in rows), rows
        refusals = page.inner_text("main").split("Refusals the sites sent")[1]
        assert "refused" in refusals and "min_noise_multiplier=2" in refusals
        screenshot(page, "coordinator-sites", tmp_path)
        page.goto(url + "/runs")
        tls = page.inner_text("tr:has(td:text-is('tls'))")
        assert "finished" in tls and "site-1" in tls
        link = page.get_attribute("tr:has(td:text-is('tls')) a", "href")
        assert link is not None and "#/experiments/" in link
        screenshot(page, "coordinator-runs", tmp_path)
    # A deployed site's console names the coordinator it dials and when it last answered.
    app, password = create_site_console(cluster.site_kit("site-3") / "state")
    with serving(app) as url:
        page = browser.new_page()
        sign_in(page, url, "admin", password)
        status = page.inner_text("main")
        assert f"127.0.0.1:{cluster.port}" in status and "min_noise_multiplier=2" in status


def test_killed_site_round_completes_with_the_others_and_site_rejoins(cluster: Cluster):
    proc, _ = launch(
        cluster, "crash", "rounds=8", "federation.min_sites=2", "federation.round_timeout=300"
    )
    site3 = next(p for p in cluster.procs if p.name == "site-3" and p.popen.poll() is None)
    # Round 1 done at site-3 (trained and evaluated); kill it when round 2 reaches it.
    site3.wait_for("[run crash][site site-3][round 1] evaluated", 900)
    seen = site3.text().count(STARTED)
    deadline = time.monotonic() + 300
    while site3.text().count(STARTED) == seen:
        assert time.monotonic() < deadline, site3.text()[-4000:]
        time.sleep(0.1)
    kill_tree(site3.popen, sig=signal.SIGKILL)
    # The round goes on without site-3 (the SuperLink declares it gone after two missed
    # heartbeats); once it is over, site-3 comes back with the same kit.
    site1 = next(p for p in cluster.procs if p.name == "site-1")
    site1.wait_for("[run crash][site site-1][round 2] evaluated", 900)
    restarted = cluster.start_site("site-3")
    out = finish(proc)
    assert proc.popen.returncode == 0, out[-6000:] + cluster.logs()
    history = RunHistory.load(cluster.root / "outputs" / "crash" / "history.json")
    by_round = {r.round: r for r in history.rounds}
    assert set(by_round[1].site_train) == set(SITES)
    assert set(by_round[2].site_train) == {"site-1", "site-2"}, by_round[2]
    # Rounds take seconds: site-3 is back within the six that follow (its restart and
    # the SuperLink seeing it take about 15 s).
    later = [set(by_round[r].site_train) for r in range(3, 9)]
    assert any("site-3" in s for s in later), (later, restarted.text()[-3000:])
    assert len(history.rounds) == 9
