"""Fixtures for the agent_client tests: in-process fake servers on 127.0.0.1. No database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from agent_client.testing import FakeHttpServer, FakeWebSocketServer


@pytest_asyncio.fixture
async def ws_server() -> AsyncIterator[FakeWebSocketServer]:
    async with FakeWebSocketServer() as server:
        yield server


@pytest_asyncio.fixture
async def http_server() -> AsyncIterator[FakeHttpServer]:
    async with FakeHttpServer() as server:
        yield server


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"
