"""Without chromium the browser tests skip with the reason, or fail where every service must be there."""

from __future__ import annotations

import pytest

from tests.pages import browser


@pytest.fixture
def no_chromium(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(browser, "find_chromium", lambda: None)
    monkeypatch.delenv("OPAMP_REQUIRE_ALL_TEST_SERVICES", raising=False)
    monkeypatch.delenv("CI", raising=False)


def test_a_missing_chromium_skips_with_the_reason(no_chromium):
    with pytest.raises(pytest.skip.Exception, match="chromium is not installed"):
        browser.chromium_or_skip()


def test_a_missing_chromium_fails_when_every_test_service_is_required(no_chromium, monkeypatch):
    monkeypatch.setenv("OPAMP_REQUIRE_ALL_TEST_SERVICES", "1")
    with pytest.raises(pytest.fail.Exception, match="chromium is not installed"):
        browser.chromium_or_skip()


def test_opamp_chromium_names_the_browser(monkeypatch, tmp_path):
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("OPAMP_CHROMIUM", str(fake))
    assert browser.find_chromium() == str(fake)
