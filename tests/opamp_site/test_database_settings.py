"""DATABASES: PostgreSQL through a bounded connection pool, never persistent connections.

tests/e2e/test_database_connections.py checks a real server process against PostgreSQL.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from django.conf import settings
from django.db import OperationalError, connection

from opamp_site.env import ConfigurationError, database_from_url, database_pool

POOL = {"min_size": 2, "max_size": 16, "timeout": 10.0}


def test_postgresql_gets_the_pool_and_no_persistent_connections() -> None:
    entry = database_from_url("postgres://opamp:secret@db:5432/opamp", base_dir=Path("/srv"), pool=POOL)
    assert entry["OPTIONS"] == {"pool": POOL}
    # Django refuses a pool with persistent connections.
    assert entry["CONN_MAX_AGE"] == 0
    assert entry["CONN_HEALTH_CHECKS"] is True


def test_postgresql_without_a_pool_still_never_keeps_connections() -> None:
    entry = database_from_url("postgres://opamp@db/opamp", base_dir=Path("/srv"))
    assert entry["OPTIONS"] == {}
    assert entry["CONN_MAX_AGE"] == 0


def test_sqlite_ignores_the_pool() -> None:
    entry = database_from_url("sqlite:///var/opamp.sqlite3", base_dir=Path("/srv"), pool=POOL)
    assert "pool" not in entry["OPTIONS"]
    assert entry["NAME"] == "/srv/var/opamp.sqlite3"


def test_pool_options() -> None:
    assert database_pool(min_size=0, max_size=1, timeout=0.5) == {"min_size": 0, "max_size": 1, "timeout": 0.5}


@pytest.mark.parametrize(
    ("min_size", "max_size", "timeout", "names"),
    [
        (-1, 4, 10.0, "OPAMP_DB_POOL_MIN_SIZE"),
        (0, 0, 10.0, "OPAMP_DB_POOL_MAX_SIZE"),
        (8, 4, 10.0, "OPAMP_DB_POOL_MAX_SIZE"),
        (2, 4, 0.0, "OPAMP_DB_POOL_TIMEOUT"),
    ],
)
def test_pool_options_are_checked_when_settings_load(min_size: int, max_size: int, timeout: float, names: str) -> None:
    with pytest.raises(ConfigurationError, match=names):
        database_pool(min_size=min_size, max_size=max_size, timeout=timeout)


def test_the_test_profile_uses_what_production_uses() -> None:
    entry = settings.DATABASES["default"]
    assert entry["CONN_MAX_AGE"] == 0
    if entry["ENGINE"] == "django.db.backends.postgresql":
        assert entry["OPTIONS"]["pool"] == {
            "min_size": settings.OPAMP_DB_POOL_MIN_SIZE,
            "max_size": settings.OPAMP_DB_POOL_MAX_SIZE,
            "timeout": settings.OPAMP_DB_POOL_TIMEOUT,
        }


@pytest.mark.django_db
def test_an_exhausted_pool_fails_the_query_after_the_timeout() -> None:
    """A thread that finds every connection of its process in use waits `timeout` seconds,
    then gets an OperationalError that says so, instead of waiting forever."""
    if connection.vendor != "postgresql":
        pytest.skip("the pool is PostgreSQL's")
    from django.db.backends.postgresql.base import DatabaseWrapper

    tiny = {**connection.settings_dict, "OPTIONS": {"pool": database_pool(min_size=0, max_size=1, timeout=0.5)}}
    # Wrappers with the same alias share one pool, as the threads of a process do.
    holder = DatabaseWrapper(dict(tiny), "pool-exhaustion-test")
    waiter = DatabaseWrapper(dict(tiny), "pool-exhaustion-test")
    try:
        holder.ensure_connection()
        started = time.monotonic()
        with pytest.raises(OperationalError, match=r"couldn't get a connection after 0\.50 sec"):
            waiter.ensure_connection()
        assert 0.4 < time.monotonic() - started < 5
        holder.close()  # back to the pool: the next one gets it
        waiter.ensure_connection()
        assert waiter.is_usable()
    finally:
        waiter.close()
        holder.close()
        holder.close_pool()
