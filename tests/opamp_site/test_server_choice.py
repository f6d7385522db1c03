"""`python -m opamp_site.server`: which ASGI server a command line starts, and how the uvicorn
server reads daphne's options. The servers themselves are held to their bounds by
tests/e2e/test_resource_bounds.py (CI runs it under each)."""

from __future__ import annotations

import pytest
from django.conf import settings

from opamp_site.server import DEFAULT_SERVER, split_server_choice
from opamp_site.uvicorn_server import BoundedHttpProtocol, BoundedWebSocketProtocol, build_config, build_parser

UNIT_OPTIONS = ["--ping-interval", "60", "--ping-timeout", "60", "--websocket_connect_timeout", "30"]


def test_the_server_option_picks_the_server_and_leaves_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPAMP_ASGI_SERVER", raising=False)
    command = ["-b", "127.0.0.1", "-p", "8000", "opamp_site.asgi:application"]
    assert split_server_choice(["--server", "uvicorn", *command]) == ("uvicorn", command)
    assert split_server_choice(["--server=daphne", *command]) == ("daphne", command)
    assert split_server_choice(command) == (DEFAULT_SERVER, command)
    assert DEFAULT_SERVER == "daphne"


def test_the_environment_chooses_unless_the_command_line_does(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPAMP_ASGI_SERVER", "uvicorn")
    assert split_server_choice(["app"]) == ("uvicorn", ["app"])
    assert split_server_choice(["--server", "daphne", "app"]) == ("daphne", ["app"])


def test_an_unknown_server_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPAMP_ASGI_SERVER", raising=False)
    with pytest.raises(SystemExit, match="unknown server 'hypercorn'"):
        split_server_choice(["--server", "hypercorn", "app"])


def test_the_uvicorn_server_takes_the_units_options_with_the_bounds() -> None:
    options = build_parser().parse_args(["-b", "127.0.0.1", "-p", "8001", *UNIT_OPTIONS, "opamp_site.asgi:application"])
    config = build_config(options)
    assert (config.host, config.port) == ("127.0.0.1", 8001)
    assert (config.ws_ping_interval, config.ws_ping_timeout) == (60.0, 60.0)
    assert config.websocket_connect_timeout == 30.0  # type: ignore[attr-defined]
    assert config.http is BoundedHttpProtocol and config.ws is BoundedWebSocketProtocol
    assert config.ws_max_size == settings.OPAMP_MAX_MESSAGE_BYTES
    # Behind nginx the peer must stay nginx's: uvicorn's default would trust X-Forwarded-For.
    assert config.proxy_headers is False
    # A compressor per socket costs memory on every connection; daphne offers none either.
    assert config.ws_per_message_deflate is False
    assert config.timeout_graceful_shutdown == 10


def test_proxy_headers_are_read_only_when_asked_for() -> None:
    options = build_parser().parse_args(["--proxy-headers", "opamp_site.asgi:application"])
    config = build_config(options)
    assert config.proxy_headers is True
    assert config.forwarded_allow_ips == "127.0.0.1"
