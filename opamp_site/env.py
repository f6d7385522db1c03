"""The one place that reads the process environment for settings.

Every setting that varies between machines comes through these helpers, so the list of
environment variables is `grep env_ opamp_site/settings`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit


class ConfigurationError(RuntimeError):
    """A required environment variable is missing or malformed."""


def env_str(name: str, default: str | None = None) -> str:
    value = os.environ.get(name)
    if value is None or value == "":
        if default is None:
            raise ConfigurationError(f"environment variable {name} is required")
        return default
    return value


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be an integer, got {raw!r}") from None


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number, got {raw!r}") from None


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ConfigurationError(f"{name} must be true or false, got {raw!r}")


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def database_pool(*, min_size: int, max_size: int, timeout: float) -> dict[str, Any]:
    """Options for psycopg's connection pool (Django's `OPTIONS["pool"]` on PostgreSQL).

    `max_size` bounds the connections one process ever holds; a thread that finds all of
    them in use waits up to `timeout` seconds and then fails with psycopg's PoolTimeout
    ("couldn't get a connection after ... sec", an OperationalError to Django).
    """
    if min_size < 0:
        raise ConfigurationError(f"OPAMP_DB_POOL_MIN_SIZE must be 0 or more, got {min_size}")
    if max_size < 1 or max_size < min_size:
        raise ConfigurationError(
            f"OPAMP_DB_POOL_MAX_SIZE must be at least 1 and at least OPAMP_DB_POOL_MIN_SIZE ({min_size}), "
            f"got {max_size}"
        )
    if timeout <= 0:
        raise ConfigurationError(f"OPAMP_DB_POOL_TIMEOUT must be a positive number of seconds, got {timeout}")
    return {"min_size": min_size, "max_size": max_size, "timeout": timeout}


def database_from_url(url: str, *, base_dir: Path, pool: dict[str, Any] | None = None) -> dict[str, Any]:
    """Django DATABASES entry from `postgres://user:pw@host:port/name` or `sqlite:///path`.

    `pool` (from `database_pool`) applies to PostgreSQL only."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        # sqlite:///relative/path or sqlite:////absolute/path
        path = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(base_dir / path) if not Path(path).is_absolute() else path,
            # WAL lets the HTTP transport read while the heartbeat flush writes.
            "OPTIONS": {
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
            },
        }
    if parts.scheme in {"postgres", "postgresql"}:
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": unquote(parts.path.lstrip("/")),
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
            # No persistent connections: Django keeps them per thread, and under ASGI every
            # request runs in a thread of its own, so each was never reused and stayed open
            # until the garbage collector found it (one API process held 87 of PostgreSQL's
            # 100 after 126 requests). The pool bounds what a process holds, and Django's
            # close returns a connection to it (a pool requires CONN_MAX_AGE 0). With a pool,
            # CONN_HEALTH_CHECKS makes it check a connection before handing it out.
            "CONN_MAX_AGE": 0,
            "CONN_HEALTH_CHECKS": True,
            "OPTIONS": {"pool": dict(pool)} if pool else {},
        }
    raise ConfigurationError(f"unsupported database URL scheme {parts.scheme!r}")
