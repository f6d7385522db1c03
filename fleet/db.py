"""Running ORM work from the async transports.

Channels' default (`thread_sensitive=True`) runs every ORM call of the process in one
thread: with 2,000 agents applying a new config at once that thread became the bottleneck
(one publish took 36 s to reach them all, ~15 ms of serialized database round trips per
agent). On PostgreSQL the calls run in the loop's thread pool instead, each worker thread
with its own connection. SQLite, the embedded default, allows one writer at a time, so
there the single thread stays: it queues writes instead of failing them as "locked".
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from channels.db import database_sync_to_async
from django.db import connection

P = ParamSpec("P")
R = TypeVar("R")


def db(function: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """`await db(service)(...)`: the service in a thread, with connection hygiene."""
    parallel = connection.vendor == "postgresql"
    return database_sync_to_async(function, thread_sensitive=not parallel)  # type: ignore[no-any-return]
