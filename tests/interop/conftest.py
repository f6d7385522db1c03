from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CLIENTS = Path(__file__).parent / "clients"
PYTHON_CLIENT = CLIENTS / ".venv-opamp-client" / "bin" / "python"
NODE_CLIENT = CLIENTS / "node_modules" / "@elastic" / "opamp-client-node"


def _require(available: bool, reason: str) -> None:
    """Skip locally with the reason; in CI (and whenever all services are required) fail."""
    if available:
        return
    if os.environ.get("OPAMP_REQUIRE_ALL_TEST_SERVICES") or os.environ.get("CI"):
        pytest.fail(f"{reason}; run tests/interop/clients/setup.sh", pytrace=False)
    pytest.skip(f"{reason}; run tests/interop/clients/setup.sh")


@pytest.fixture
def node_client_command() -> list[str]:
    node = shutil.which("node")
    _require(node is not None and NODE_CLIENT.exists(), "the npm OpAMP client is not installed")
    return [str(node), str(CLIENTS / "node_agent.mjs")]


@pytest.fixture
def python_client_command() -> list[str]:
    _require(PYTHON_CLIENT.exists(), "the PyPI OpAMP client virtualenv is missing")
    return [str(PYTHON_CLIENT), str(CLIENTS / "python_agent.py")]
