"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from signing.config_signing import generate_signing_key
from tests.support.live_server import LiveOpampServer


@pytest.fixture
def signing_server(tmp_path: Path) -> Iterator[tuple[LiveOpampServer, Path]]:
    """A server signing package files with a key of its own; the public key's PEM file."""
    pair = generate_signing_key(tmp_path / "signing-key.pem")
    public_key = tmp_path / "trusted.pem"
    public_key.write_text(pair.public_key_pem)
    live = LiveOpampServer(tmp_path / "server", extra_env={"OPAMP_SIGNING_KEY_FILE": str(tmp_path / "signing-key.pem")})
    live.start()
    try:
        yield live, public_key
    finally:
        live.close()
