from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.garbage import Garbage, collector_held
from tests.support.live_server import LiveOpampServer


def pytest_configure(config: pytest.Config) -> None:
    # Under the production profile every service must be there: fail, never skip.
    if os.environ.get("OPAMP_TEST_PROFILE") == "production":
        missing = [name for name in ("DATABASE_URL", "REDIS_URL") if not os.environ.get(name)]
        if missing:
            raise pytest.UsageError(f"OPAMP_TEST_PROFILE=production needs {', '.join(missing)}")


def uses_database(request: pytest.FixtureRequest) -> bool:
    return bool(request.node.get_closest_marker("django_db") or {"db", "transactional_db"} & set(request.fixturenames))


@pytest.fixture(autouse=True)
def fresh_fleet_runtime(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every database test starts like a freshly started server process."""
    if not uses_database(request):
        yield
        return
    from fleet.session_runtime import reset_runtime

    reset_runtime()
    yield
    reset_runtime()


@pytest.fixture(autouse=True)
def close_connections_of_async_tests(request: pytest.FixtureRequest) -> Iterator[None]:
    """Close the connections that async code opened in asgiref's shared sync thread.

    Async tests reach the ORM through database_sync_to_async, which runs in one executor
    thread; its connection would otherwise stay open and block dropping the test database.
    Tests without database access (the pure packages' tests) never touch Django here.
    """
    yield
    if not uses_database(request):
        return
    from asgiref.sync import SyncToAsync
    from django.db import connections

    SyncToAsync.single_thread_executor.submit(connections.close_all).result(timeout=10)


@pytest.fixture(autouse=True)
def communicators_close_connections(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the application's ORM calls close their connections while a test talks to it.

    channels' test communicators replace `channels.db.close_old_connections` with a no-op
    (`channels.testing.application.no_op`) while they run the application, to keep a Django
    TestCase's connection, which lives in the test's thread, open. On PostgreSQL the
    application's ORM calls run in the event loop's thread pool instead (fleet/db.py), so
    their connections were never closed: never given back to the pool, which then ran dry
    (every later query waited OPAMP_DB_POOL_TIMEOUT and failed), and still open when the test
    database was dropped. Here they are closed in every thread but the test's own.
    """
    if not uses_database(request):
        return
    import channels.testing.application
    from django.db import close_old_connections

    def close_outside_the_test_thread() -> None:
        if threading.current_thread() is not threading.main_thread():
            close_old_connections()

    monkeypatch.setattr(channels.testing.application, "no_op", close_outside_the_test_thread)


@pytest.fixture
def opamp_server(tmp_path: Path) -> Iterator[LiveOpampServer]:
    """A running server process with its own database; stopped and dropped afterwards."""
    server = LiveOpampServer(tmp_path / "server")
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def garbage() -> Iterator[Garbage]:
    """The cyclic garbage collector held: what it finds is counted when the test asks."""
    with collector_held() as kept:
        yield kept
