"""The site console in a real headless browser, on a site of a real simulated run."""

from __future__ import annotations

import json
import re

from client.console import create_site_console
from client.state import SitePolicy, SiteState
from medfed.cli import main as medfed
from server.loop import RunHistory
from tests.conftest import SITES
from tests.console_browser import browser, screenshot, serving, sign_in  # noqa: F401
from tests.helpers import medfed_run

RUN = ["federation.min_sites=1", "rounds=1"]


def _history(tmp_path, name):
    return RunHistory.load(tmp_path / "outputs" / name / "history.json").rounds[1]


def test_a_plan_is_approved_and_revoked_in_the_browser_and_the_site_obeys(
    tmp_path,
    consortium,
    browser,  # noqa: F811
):
    root, _ = consortium
    state = tmp_path / "site-state"
    for site in SITES:
        SitePolicy(max_epsilon=50, delta=1e-5).save(state / site / "policy.yaml")
    site1 = state / "site-1"
    assert medfed(["site", "policy", "--state", str(site1), "--require-plan-approval"]) == 0
    # A real run asks site-1 for a plan it has not approved: it refuses, keeping it pending.
    assert medfed_run(tmp_path, root, "run_name=first", *RUN).returncode == 0
    assert "site-1" in _history(tmp_path, "first").failures

    app, password = create_site_console(site1)
    assert password is not None and create_site_console(site1)[1] is None  # shown once
    with serving(app) as url:
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        # Nothing without signing in; no form post without the session's CSRF token.
        anonymous = page.request.get(url + "/budget", max_redirects=0)
        assert anonymous.status == 302 and anonymous.headers["location"].endswith("/login")
        assert page.request.post(url + "/plans/approve", form={"plan": "x"}).status == 400
        sign_in(page, url, "admin", "wrong")
        assert "Wrong user or password" in page.content()
        sign_in(page, url, "admin", password)
        assert page.url.endswith("/status")
        assert "not approved at this site" in page.inner_text("main")
        screenshot(page, "status", tmp_path)

        page.goto(url + "/plans")
        assert "pending" in page.inner_text("main")
        # What the run would spend here, from the dataset the refused run prepared.
        spend = re.search(r"would spend here: (\d+\.\d{3}) \(dataset ds-", page.inner_text("#plan"))
        assert spend is not None and float(spend.group(1)) > 0
        screenshot(page, "plans", tmp_path)
        forged = page.request.post(url + "/plans/approve", form={"plan": "x", "csrf": "forged"})
        assert forged.status == 400
        page.fill("input[name=note]", "reviewed with the ethics board")
        page.click("button:has-text('Approve')")
        plans = SiteState(site1, "site-1").plans
        [(plan, row)] = plans.statuses().items()
        assert row["status"] == "approved" and row["by"] == "admin"  # who signed in
        assert plans.audit.entries()[-1]["details"]["note"] == "reviewed with the ethics board"

        # The next run trains at site-1, within its budget, on the approved plan.
        assert medfed_run(tmp_path, root, "run_name=second", *RUN).returncode == 0
        assert "site-1" in _history(tmp_path, "second").site_train
        page.goto(url + "/budget")
        assert "Ledger verified: 1 entries" in page.inner_text("#verified")
        assert page.locator("svg polyline").count() == 1  # spend over time, one dataset
        screenshot(page, "budget", tmp_path)

        page.goto(url + f"/plans?plan={plan}")
        page.fill("input[name=reason]", "the board withdrew consent")
        page.click("button:has-text('Revoke')")
        assert plans.status(plan) == "revoked"
        assert medfed_run(tmp_path, root, "run_name=third", *RUN).returncode == 0
        assert "revoked" in _history(tmp_path, "third").failures["site-1"]
        page.goto(url + "/status")
        assert "third" in page.inner_text("main") and "revoked" in page.inner_text("main")

        # A ledger changed behind the site's back is shown as such.
        ledger = site1 / "ledger.jsonl"
        entry = json.loads(ledger.read_text().splitlines()[0])
        entry["epsilon"] = entry["epsilon"] / 2
        ledger.write_text(json.dumps(entry) + "\n")
        page.goto(url + "/budget")
        assert "Ledger NOT verified" in page.inner_text("#verified")

        page.goto(url + "/data")
        assert "series of" in page.inner_text("main")
        screenshot(page, "data", tmp_path)
        page.click("button:has-text('Sign out')")
        page.goto(url + "/plans")
        assert page.url.endswith("/login")
