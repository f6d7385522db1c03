"""Package downloads against a local file server: resumed with Range, restarted cleanly, bounded."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from agent_client.package_downloads import DownloadFailed, DownloadProgress, download_file
from tests.agent_client.file_server import FileServer

CONTENT = os.urandom(300_000)
PATH = "/files/otelcol-2.0.0"


@pytest_asyncio.fixture
async def files() -> AsyncIterator[FileServer]:
    async with FileServer() as server:
        server.files[PATH] = CONTENT
        yield server


async def download(server: FileServer, partial: Path | None, *, max_bytes: int = 10_000_000, attempts: int = 3):
    progress: list[DownloadProgress] = []

    async def record(update: DownloadProgress) -> None:
        progress.append(update)

    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        result = await download_file(
            client,
            url=server.url(PATH),
            headers={"Authorization": "Bearer t"},
            partial=partial,
            max_bytes=max_bytes,
            attempts=attempts,
            retry_delay=0.0,
            on_progress=record,
            progress_interval=0.0,
        )
    return result, progress


async def test_a_download_cut_half_way_resumes_with_a_range_request_and_the_bytes_are_exact(
    files: FileServer, tmp_path: Path
) -> None:
    files.cut_next(len(CONTENT) // 2)
    partial = tmp_path / "otelcol.part"

    result, progress = await download(files, partial)

    first, second = files.requests_for(PATH)
    assert "range" not in first
    assert second["range"] == f"bytes={len(CONTENT) // 2}-"
    assert second["if-range"] == files.etag(PATH)
    assert second["authorization"] == "Bearer t"
    assert result.resumed == 1
    assert partial.read_bytes() == CONTENT
    assert result.sha256 == hashlib.sha256(CONTENT).digest()
    assert result.size == len(CONTENT)
    assert progress[-1].percent == 100.0
    assert all(update.bytes_per_second >= 0 for update in progress)


async def test_a_partial_left_by_an_earlier_process_is_resumed(files: FileServer, tmp_path: Path) -> None:
    files.cut_next(100_000)
    partial = tmp_path / "otelcol.part"
    with pytest.raises(DownloadFailed, match="after 1 attempts"):
        await download(files, partial, attempts=1)
    assert partial.read_bytes() == CONTENT[:100_000]

    result, _ = await download(files, partial)

    assert files.requests_for(PATH)[-1]["range"] == "bytes=100000-"
    assert partial.read_bytes() == CONTENT
    assert result.sha256 == hashlib.sha256(CONTENT).digest()


async def test_a_file_changed_on_the_server_restarts_the_download_cleanly(files: FileServer, tmp_path: Path) -> None:
    files.cut_next(100_000)
    partial = tmp_path / "otelcol.part"
    with pytest.raises(DownloadFailed):
        await download(files, partial, attempts=1)
    changed = os.urandom(200_000)
    files.files[PATH] = changed  # another ETag: If-Range fails and the server answers 200

    result, _ = await download(files, partial)

    assert files.requests_for(PATH)[-1]["range"] == "bytes=100000-"
    assert result.resumed == 0
    assert partial.read_bytes() == changed
    assert result.sha256 == hashlib.sha256(changed).digest()


async def test_a_server_without_ranges_gets_the_whole_file_again(files: FileServer, tmp_path: Path) -> None:
    files.supports_ranges = False
    files.cut_next(50_000)
    partial = tmp_path / "otelcol.part"

    result, _ = await download(files, partial)

    assert partial.read_bytes() == CONTENT
    assert result.resumed == 0


async def test_without_a_partial_file_the_bytes_are_hashed_and_resumed_in_memory(files: FileServer) -> None:
    files.cut_next(len(CONTENT) // 3)

    result, _ = await download(files, None)

    assert result.path is None
    assert result.resumed == 1
    assert result.sha256 == hashlib.sha256(CONTENT).digest()


async def test_a_file_over_the_bound_is_refused(files: FileServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadFailed, match="more than the 1000 allowed"):
        await download(files, tmp_path / "otelcol.part", max_bytes=1000)


async def test_a_missing_file_is_refused_without_retrying(files: FileServer, tmp_path: Path) -> None:
    files.files.clear()
    with pytest.raises(DownloadFailed, match="HTTP 404"):
        await download(files, tmp_path / "otelcol.part")
    assert len(files.requests) == 1


async def test_a_download_cut_on_every_attempt_fails_after_the_attempts(files: FileServer, tmp_path: Path) -> None:
    for _ in range(3):
        files.cut_next(10_000)
    with pytest.raises(DownloadFailed, match="after 3 attempts"):
        await download(files, tmp_path / "otelcol.part")
    assert len(files.requests_for(PATH)) == 3


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x", "not a url"])
async def test_only_http_urls_are_fetched(url: str) -> None:
    async with httpx.AsyncClient(trust_env=False) as client:
        with pytest.raises(DownloadFailed, match="not an http"):
            await download_file(
                client,
                url=url,
                headers={},
                partial=None,
                max_bytes=100,
                attempts=1,
                retry_delay=0,
                on_progress=lambda _: asyncio.sleep(0),
                progress_interval=1,
            )
