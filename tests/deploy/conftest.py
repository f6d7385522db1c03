from __future__ import annotations

import os

import pytest

from tests.deploy.nginx import find_nginx


def _nginx_required() -> bool:
    """Like the interop clients: missing nginx skips locally, fails where it must be present."""
    names = ("OPAMP_REQUIRE_NGINX", "OPAMP_REQUIRE_ALL_TEST_SERVICES", "CI")
    return any(os.environ.get(name, "") not in ("", "0") for name in names)


@pytest.fixture(scope="session")
def nginx_binary() -> str:
    binary = find_nginx()
    if binary is not None:
        return binary
    reason = "nginx is not installed (not on PATH, not in /usr/sbin); apt-get install -y nginx"
    if _nginx_required():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)
