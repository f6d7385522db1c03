"""The operator pages in headless Chromium against a live server with a real Celery beat.

Each page renders with data (a screenshot of each is written to OPAMP_SCREENSHOT_DIR, or to
opamp-screenshots/ in the system's temporary directory; `OPAMP_SCREENSHOT_DIR=docs/screenshots` refreshes the
pictures kept in the repository); the
rollout page changes by itself while beat advances a rollout; its buttons run the verbs;
a viewer sees none and is refused when trying anyway.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.pages.browser import CHROMIUM_ARGS, chromium_or_skip, simulating
from tests.support.live_server import LiveOpampServer

# A live server, Celery beat and 10 agents on a 2-core machine shared with other work.
pytestmark = [pytest.mark.live_server, pytest.mark.timeout(600)]

AGENTS = 10
VIEWER_PASSWORD = "viewer-password-1"
MAKE_VIEWER = (
    "from django.contrib.auth.models import User; from fleet.roles import grant_role; "
    f"grant_role(user=User.objects.create_user('vera', password='{VIEWER_PASSWORD}'), role='viewer')"
)


def files(body: str) -> dict[str, Any]:
    return {"collector.yaml": {"body": body, "content_type": "text/yaml"}}


@pytest.fixture(scope="module")
def chromium() -> str:
    return chromium_or_skip()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, chromium: str) -> Iterator[LiveOpampServer]:
    workdir = tmp_path_factory.mktemp("browser")
    live = LiveOpampServer(workdir / "server", extra_env={"OPAMP_ROLLOUT_TICK_SECONDS": "1"})
    live.start()
    live.start_celery()
    try:
        with simulating(
            live.ws_url, AGENTS, "--attr", "service.name=web", "--label", "env=prod", "--apply-delay", "1.5"
        ):
            live.manage("shell", "-c", MAKE_VIEWER)
            live.api_post("configurations/", {"name": "web", "selector": "service.name=web"})
            live.api_post("configurations/web/versions/", {"files": files("receivers:\n  otlp: {}\n")})
            live.api_post(
                "configurations/web/versions/",
                {"files": files("receivers:\n  otlp: {}\nexporters:\n  debug: {}\n"), "activate": False},
            )
            live.wait_for(
                lambda: live.api("configurations/web/versions/1/status/")["applied"] == AGENTS,
                timeout=60,
                what="the simulated agents on version 1",
            )
            yield live
    finally:
        live.close()


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def logged_in(browser: Any, server: LiveOpampServer, username: str, password: str) -> Any:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("dialog", lambda dialog: dialog.accept())  # the confirmations
    page.goto(f"http://127.0.0.1:{server.port}/login/?next=/fleet/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("button[type=submit]")
    page.wait_for_url("**/fleet/")
    return page


def admin_password(server: LiveOpampServer) -> str:
    return (Path(server.env["OPAMP_VAR_DIR"]) / "admin-password").read_text().strip()


def shot(page: Any, name: str) -> None:
    # A test run leaves the committed pictures alone unless asked to refresh them.
    directory = Path(os.environ.get("OPAMP_SCREENSHOT_DIR") or Path(tempfile.gettempdir()) / "opamp-screenshots")
    directory.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(directory / f"{name}.png"), full_page=True)


def test_each_page_renders_with_data(server, browser):
    page = logged_in(browser, server, "admin", admin_password(server))
    assert page.locator("#agents tbody tr").count() == AGENTS
    assert "web" in page.inner_text("#agents")
    page.fill("input[name=selector]", "env=prod")
    page.click("#filters button[type=submit]")
    page.wait_for_url("**selector=env%3Dprod**")
    assert page.locator("#agents tbody tr").count() == AGENTS
    shot(page, "fleet")

    page.click("#agents tbody tr:first-child a")
    page.wait_for_selector("#identity")
    assert "applied version 1" in page.inner_text("#config-state")
    assert "healthy" in page.inner_text("#health")
    shot(page, "agent")

    page.goto(f"http://127.0.0.1:{server.port}/configurations/web/?from=1&to=2")
    assert page.locator("#versions tbody tr").count() == 2
    assert "exporters:" in page.inner_text("table.diff")
    page.fill("#publish textarea[name=body]", "receivers: {}\n")
    page.fill("#publish input[name=content_type]", "image/png")
    page.click("#publish button[type=submit]")
    assert "content type 'image/png'" in page.inner_text("#publish-errors")
    shot(page, "configuration")

    page.goto(f"http://127.0.0.1:{server.port}/rollouts/new/?configuration=web")
    assert page.locator("#stage-editor tbody tr").count() == 3  # 1% -> 10% -> 100%
    page.click("#add-stage")
    assert page.locator("#stage-editor tbody tr").count() == 4
    page.locator("#stage-editor tbody tr").nth(3).locator(".remove-stage").click()
    page.click("#preview")
    page.wait_for_selector("#preview-table")
    cumulative = page.locator("#preview-table tbody tr").last.locator("td").nth(3).inner_text()
    assert cumulative == str(AGENTS)
    shot(page, "rollout-new")

    server.manage(
        "shell",
        "-c",
        "import uuid; from signing.models import CertificateRequest; "
        "CertificateRequest.objects.create(instance_uid=uuid.uuid4(), csr_pem='x', key_type='ecdsa-p256')",
    )
    page.goto(f"http://127.0.0.1:{server.port}/certificate-requests/")
    assert page.locator("#pending tbody tr").count() == 1
    assert page.locator("#pending button", has_text="approve").count() == 1
    shot(page, "certificate-requests")
    page.close()


def test_the_rollout_page_follows_beat_without_a_reload_and_its_buttons_run_the_verbs(server, browser):
    page = logged_in(browser, server, "admin", admin_password(server))
    page.goto(f"http://127.0.0.1:{server.port}/rollouts/new/?configuration=web")
    rows = page.locator("#stage-editor tbody tr")
    rows.nth(0).locator("input[name=stage_size]").fill("30")
    rows.nth(0).locator("input[name=stage_hold]").fill("2")
    rows.nth(1).locator(".remove-stage").click()
    page.locator("#stage-editor tbody tr").nth(1).locator("input[name=stage_hold]").fill("0")
    page.click("#create")
    page.wait_for_selector("#stages")
    assert page.inner_text("#rollout-state") == "draft"
    page.evaluate("window.loadedOnce = true")  # gone if the page reloads
    page.click("#verbs button:has-text('start')")
    page.wait_for_function("document.querySelector('#rollout-state').textContent === 'running'")
    page.evaluate("window.loadedOnce = true")  # the verb's POST navigated once; from here on, no reload
    at_start = page.inner_text("#stages")
    page.wait_for_function("document.querySelector('#rollout-state').textContent === 'succeeded'", timeout=240_000)
    assert page.evaluate("window.loadedOnce") is True
    assert page.inner_text("#stages") != at_start  # the counts moved on, with no reload
    applied = [int(t) for t in page.locator("#stages .applied-count").all_inner_texts()]
    assert sum(applied) == AGENTS
    timeline = page.inner_text("#events")
    assert "stage_started" in timeline and "succeeded" in timeline
    shot(page, "rollout")
    page.close()


def test_a_viewer_sees_no_buttons_and_is_refused_when_acting_anyway(server, browser):
    rollout = server.api("rollouts/")["results"][0]
    page = logged_in(browser, server, "vera", VIEWER_PASSWORD)
    page.goto(f"http://127.0.0.1:{server.port}/rollouts/{rollout['id']}/")
    page.wait_for_selector("#stages")
    assert page.locator("#verbs").count() == 0
    assert page.locator("main button").count() == 0
    status = page.evaluate(
        """async (url) => {
            const token = document.cookie.split('; ').find(c => c.startsWith('csrftoken=')).split('=')[1];
            const response = await fetch(url, {method: 'POST', headers: {'X-CSRFToken': token,
                'Content-Type': 'application/x-www-form-urlencoded'}, body: 'verb=retry'});
            return response.status;
        }""",
        f"/rollouts/{rollout['id']}/",
    )
    assert status == 403
    assert server.api(f"rollouts/{rollout['id']}/")["state"] == rollout["state"]
    page.close()
