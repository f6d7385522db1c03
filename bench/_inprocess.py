"""What the in-process CPU benches share: a PostgreSQL database of their own for the run,
and the fleet state they measure against (three configurations published, one a service)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import psycopg


@contextmanager
def scratch_database(prefix: str) -> Iterator[None]:
    """DATABASE_URL names a new database `<prefix>_<random>` while the block runs; it is
    dropped afterwards. Enter it before Django is set up: the settings read DATABASE_URL."""
    base = urlsplit(os.environ["DATABASE_URL"])
    admin_url = urlunsplit(base._replace(path="/postgres"))
    name = f"{prefix}_{secrets.token_hex(3)}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    os.environ["DATABASE_URL"] = urlunsplit(base._replace(path="/" + name))
    try:
        yield
    finally:
        # Django is imported only once the block has pointed DATABASE_URL at the new database.
        from django.db import connections

        connections.close_all()
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def set_up_published_fleet() -> None:
    """Django set up and the database migrated, with `config-0` to `config-2` published,
    each selecting the agents whose service.name is `service-0` to `service-2`."""
    import django

    django.setup()
    from django.core.management import call_command

    from rollouts import services

    call_command("migrate", verbosity=0)
    for index in range(3):
        configuration = services.configuration_create(
            name=f"config-{index}", selector=f"service.name=service-{index}", actor=None
        )
        services.configuration_publish(
            configuration=configuration,
            files={"collector.yaml": {"body": f"x: {index}\n", "content_type": "text/yaml"}},
            author=None,
        )
