"""Reconnect backoff: full jitter under a doubling ceiling, raised to the server's hints."""

from __future__ import annotations

import asyncio
import random
import socket
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from agent_client import Backoff
from agent_client.testing import FakeHttpServer, FakeWebSocketServer, HttpRequest, HttpResponse, echo_reply
from agent_client.transport import parse_retry_after
from opamp.proto import opamp_pb2 as pb
from tests.agent_client.helpers import QUIET, RetryRecorder, is_full_report, make_agent, running


def test_each_delay_stays_under_a_ceiling_that_doubles_up_to_the_maximum() -> None:
    backoff = Backoff(initial=0.5, maximum=30.0, rng=random.Random(7))
    ceilings = []
    for _ in range(10):
        ceiling = backoff.ceiling()
        ceilings.append(ceiling)
        assert 0 <= backoff.next_delay() <= ceiling
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]


def test_delays_are_jittered_not_fixed() -> None:
    backoff = Backoff(initial=10.0, maximum=10.0, rng=random.Random(1))
    assert len({round(backoff.next_delay(), 6) for _ in range(20)}) > 15


def test_a_server_hint_is_a_lower_bound_on_the_delay() -> None:
    backoff = Backoff(initial=0.5, maximum=1.0, rng=random.Random(3))
    assert all(backoff.next_delay(at_least=5.0) >= 5.0 for _ in range(20))


def test_reset_starts_again_from_the_initial_ceiling() -> None:
    backoff = Backoff(initial=0.5, maximum=30.0)
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.ceiling() == 0.5


@pytest.mark.parametrize(
    ("header", "expected"),
    [("7", 7.0), (" 120 ", 120.0), ("Wed, 01 Jan 2031 00:00:30 GMT", 30.0), ("soon", None), (None, None)],
)
def test_retry_after_is_read_as_seconds_or_as_an_http_date(header: str | None, expected: float | None) -> None:
    now = datetime(2031, 1, 1, tzinfo=UTC)
    assert parse_retry_after(header, now=now) == expected


def unavailable(seconds: float) -> pb.ServerToAgent:
    return pb.ServerToAgent(
        error_response=pb.ServerErrorResponse(
            type=pb.ServerErrorResponseType_Unavailable,
            error_message="overloaded",
            retry_info=pb.RetryInfo(retry_after_nanoseconds=int(seconds * 1e9)),
        )
    )


async def test_an_unavailable_answer_delays_the_reconnect_by_its_retry_info(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    ws_server.responder = lambda message: (
        unavailable(0.3) if len(ws_server.connection_times) == 1 else echo_reply(message)
    )
    recorder = RetryRecorder()
    async with running(make_agent(ws_server.url, state_dir, QUIET, recorder)):
        await ws_server.next_message()
        again = await ws_server.next_message()

    first_connect, second_connect = ws_server.connection_times[:2]
    # The backoff alone would wait at most 0.05 s (QUIET's maximum).
    assert second_connect - first_connect >= 0.3
    assert recorder.delays[0] >= 0.3
    assert recorder.errors[0] == "server unavailable: overloaded"
    assert is_full_report(again)


async def test_an_http_503_with_retry_after_schedules_the_next_attempt_no_sooner(state_dir: Path) -> None:
    def busy(request: HttpRequest) -> HttpResponse:
        return HttpResponse(503, {"Retry-After": "7"})

    recorder = RetryRecorder()
    async with FakeHttpServer(intercept=busy) as server, running(make_agent(server.url, state_dir, QUIET, recorder)):
        async with asyncio.timeout(2):
            await recorder.scheduled.wait()
    assert recorder.delays[0] >= 7.0
    assert recorder.errors[0] == "server answered HTTP 503"
    assert len(server.requests) == 1


async def test_a_websocket_upgrade_refused_with_429_honours_retry_after(state_dir: Path) -> None:
    def too_many(connection: ServerConnection, request: Request) -> Response:
        response = connection.respond(429, "slow down\n")
        response.headers["Retry-After"] = "5"
        return response

    recorder = RetryRecorder()
    async with (
        FakeWebSocketServer(process_request=too_many) as server,
        running(make_agent(server.url, state_dir, QUIET, recorder)),
    ):
        async with asyncio.timeout(2):
            await recorder.scheduled.wait()
    assert recorder.delays[0] >= 5.0
    assert "HTTP 429" in recorder.errors[0]


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_refused_connection_is_retried_within_the_backoff_bounds(state_dir: Path) -> None:
    recorder = RetryRecorder()
    settings = replace(QUIET, backoff_initial=0.01, backoff_max=0.04)
    url = f"ws://127.0.0.1:{unused_port()}/v1/opamp"
    async with running(make_agent(url, state_dir, settings, recorder)):
        async with asyncio.timeout(2):
            while len(recorder.delays) < 4:
                await asyncio.sleep(0.01)
    assert all(0 <= delay <= 0.04 for delay in recorder.delays)
