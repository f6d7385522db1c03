"""A package rollout made and followed on the operator pages in headless Chromium, against a
live server with a real Celery beat and simulated agents that install packages (a fifth of
them fail every install).

The new-rollout form refuses stages that are not nested with the service's message, then
creates the rollout of version 2.0.0; started from its page, the rollout page lists the
agents whose install failed with their error and counts the package statuses of the agents
given the candidate, without a reload.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from agent_client.agent_packages import DRILL_FAILURE
from rollouts.rollout_services.creation import STAGES_NOT_NESTED
from tests.pages.browser import simulating
from tests.pages.test_browser import admin_password, browser, chromium, logged_in, shot  # noqa: F401
from tests.support.live_server import LiveOpampServer

pytestmark = [pytest.mark.live_server, pytest.mark.timeout(600)]

AGENTS = 10
FAILING = 2  # --package-fail-fraction 0.2, spread over the fleet


def upload(server: LiveOpampServer, version: str) -> None:
    server.api_post("packages/collector/versions/", {"version": version})
    response = httpx.post(
        f"http://127.0.0.1:{server.port}/api/v1/packages/collector/versions/{version}/files/",
        content=f"collector {version}\n".encode() * 1000,
        headers={"Authorization": f"Token {server.token}", "Content-Type": "application/octet-stream"},
        timeout=30,
    )
    assert response.status_code == 201, response.text


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, chromium: str) -> Iterator[LiveOpampServer]:  # noqa: F811
    live = LiveOpampServer(
        tmp_path_factory.mktemp("package-pages") / "server", extra_env={"OPAMP_ROLLOUT_TICK_SECONDS": "1"}
    )
    live.start()
    live.start_celery()
    try:
        with simulating(
            live.ws_url, AGENTS, "--label", "env=pkg", "--packages", "--package-fail-fraction", str(FAILING / AGENTS)
        ):
            live.api_post("packages/", {"name": "collector", "type": "top_level"})
            upload(live, "1.0.0")
            upload(live, "2.0.0")
            live.api_post(
                "package-assignments/",
                {"name": "pkg", "package": "collector", "version": "1.0.0", "selector": "env=pkg"},
            )
            live.wait_for(
                lambda: (
                    live.api("packages/collector/status/")["versions"].get("1.0.0", {}).get("installed")
                    == AGENTS - FAILING
                ),
                timeout=90,
                what="the simulated agents with collector 1.0.0 installed",
            )
            yield live
    finally:
        live.close()


def test_a_package_rollout_is_made_on_the_form_and_its_page_shows_failures_and_statuses(server, browser):  # noqa: F811
    page: Any = logged_in(browser, server, "admin", admin_password(server))
    page.goto(f"http://127.0.0.1:{server.port}/rollouts/new/?kind=package")
    assert page.inner_text("#stable") == "rolling out from 1.0.0"
    assert page.locator("select[name=candidate] option").all_inner_texts() == ["2.0.0"]
    rows = page.locator("#stage-editor tbody tr")
    rows.nth(0).locator("input[name=stage_size]").fill("50")
    rows.nth(1).locator("input[name=stage_size]").fill("10")
    page.click("#create")
    page.wait_for_selector("#errors")
    assert page.inner_text("#errors") == STAGES_NOT_NESTED.format(index=1)

    rows = page.locator("#stage-editor tbody tr")
    rows.nth(2).locator(".remove-stage").click()
    rows.nth(1).locator(".remove-stage").click()
    page.locator("#stage-editor tbody tr").nth(0).locator("input[name=stage_size]").fill("100")
    page.locator("#stage-editor tbody tr").nth(0).locator("input[name=stage_hold]").fill("0")
    page.fill("input[name=max_failure_percent]", "50")
    page.click("#create")
    page.wait_for_selector("#stages")
    assert page.inner_text("#rollout-state") == "draft"
    assert "package collector: 1.0.0 → 2.0.0" in page.inner_text("h1")
    page.click("#verbs button:has-text('start')")
    page.wait_for_function("document.querySelector('#rollout-state').textContent !== 'draft'")
    page.evaluate("window.loadedOnce = true")  # gone if the page reloads
    page.wait_for_function(
        f"document.querySelectorAll('#failed-agents td.bad').length === {FAILING}"
        f" && document.querySelector('#package-statuses tr[data-version=\"2.0.0\"] .installed')"
        f".textContent === '{AGENTS - FAILING}'",
        timeout=120_000,
    )
    assert page.evaluate("window.loadedOnce") is True
    assert page.locator("#failed-agents td.bad").all_inner_texts() == [DRILL_FAILURE] * FAILING
    assert f"Failed agents ({FAILING})" in page.inner_text("#live")
    candidate = page.locator('#package-statuses tr[data-version="2.0.0"]')
    assert candidate.locator(".failed").inner_text() == str(FAILING)
    shot(page, "package-rollout")
    page.close()
