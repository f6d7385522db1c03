"""A server process keeps its PostgreSQL connections within its pool, however many requests.

Django's persistent connections belong to a thread, and under ASGI every request to Django
runs in a thread of its own: with CONN_MAX_AGE=60 each REST API request left a connection
open until the garbage collector (tuned to run rarely, opamp/runtime.py) found it, and in
the 18,000-agent drill one API process held 87 of PostgreSQL's 100 after 126 requests. The
production settings now give each process a pool of at most OPAMP_DB_POOL_MAX_SIZE.

The server runs the production settings module itself, as deployed. Its connections are
told apart in pg_stat_activity by the application name libpq takes from PGAPPNAME.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
import pytest

from opamp.identifiers import uuid7
from tests.fleet.messages import full_report
from tests.support.live_server import LiveOpampServer, production_profile

pytestmark = [
    pytest.mark.live_server,
    pytest.mark.skipif(
        not production_profile(), reason="counts PostgreSQL connections: needs OPAMP_TEST_PROFILE=production"
    ),
]

POOL_MAX = 4
API_REQUESTS = 150
REPORT_EVERY = 5  # one agent report after every 5 API requests
BATCH = 15
CONCURRENCY = 8
APPLICATION_NAME = "opamp-test-api-connections"
API_PATHS = ["agents/", "configurations/", "audit/", "rollouts/", "enrollment-tokens/"]


@pytest.fixture
def api_server(tmp_path: Path) -> Iterator[LiveOpampServer]:
    server = LiveOpampServer(
        tmp_path / "server",
        extra_env={
            "DJANGO_SETTINGS_MODULE": "opamp_site.settings.production",
            "OPAMP_DB_POOL_MIN_SIZE": "1",
            "OPAMP_DB_POOL_MAX_SIZE": str(POOL_MAX),
            "OPAMP_DB_POOL_TIMEOUT": "5",
            # Agents report without credentials here; the API still needs its token.
            "OPAMP_AGENT_AUTH": "open",
        },
        # The daphne process only: migrate and the other management commands are not counted.
        first_process_env={"PGAPPNAME": APPLICATION_NAME},
    )
    server.start()
    try:
        yield server
    finally:
        server.close()


def server_connections(server: LiveOpampServer) -> int:
    with psycopg.connect(server.database.url, autocommit=True) as connection:
        row = connection.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = %s",
            [APPLICATION_NAME],
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_api_requests_never_hold_more_connections_than_the_pool(api_server: LiveOpampServer) -> None:
    """150 authenticated API requests, 8 at a time, with agents' reports over the plain-HTTP
    transport among them (those run their ORM calls in the event loop's thread pool)."""
    base = f"http://127.0.0.1:{api_server.port}"
    headers = {"Authorization": f"Token {api_server.token}"}
    jobs: list[str] = []
    for index in range(API_REQUESTS):
        jobs.append(API_PATHS[index % len(API_PATHS)])
        if index % REPORT_EVERY == REPORT_EVERY - 1:
            jobs.append("report")

    def run(client: httpx.Client, job: str) -> tuple[str, int]:
        if job == "report":
            body = full_report(uuid7().bytes, 0, service="connections").SerializeToString()
            response = client.post(f"{base}/v1/opamp", content=body, headers={"Content-Type": "application/x-protobuf"})
        else:
            response = client.get(f"{base}/api/v1/{job}", headers=headers)
        return job, response.status_code

    answers: Counter[tuple[str, int]] = Counter()
    held: list[int] = []
    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(CONCURRENCY) as executor:
        for start in range(0, len(jobs), BATCH):
            answers.update(executor.map(lambda job: run(client, job), jobs[start : start + BATCH]))
            held.append(server_connections(api_server))
            # Stop at the first excess: a leaking server takes PostgreSQL's connections from
            # everything else using it.
            assert held[-1] <= POOL_MAX, (
                f"the server process holds {held[-1]} connections after {start + BATCH} requests "
                f"(counts so far {held}); its pool allows {POOL_MAX}\n{api_server.log()[-3000:]}"
            )

    assert {status for _, status in answers} == {200}, answers
    assert sum(count for (job, _), count in answers.items() if job != "report") == API_REQUESTS
    # The count is not vacuous: the filter sees the server's connections (the pool keeps one).
    assert min(held) >= 1, held
    # Every report was stored: no request of either kind lost its turn for a connection.
    assert api_server.api("agents/", limit=1)["count"] == jobs.count("report")
