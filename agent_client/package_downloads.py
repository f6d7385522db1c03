"""Downloading a package file: streamed, bounded, resumed with Range requests, hashed as it arrives.

`download_file` fetches `DownloadableFile.download_url` with the offer's headers. The bytes
go to a partial file (or, for a simulated agent, nowhere: they are only hashed). A
download cut half-way is resumed, on the next attempt or by the next process, with
`Range: bytes=<have>-` and `If-Range` carrying the validator (ETag, else Last-Modified)
of the response the partial came from: a 206 whose Content-Range starts where the
partial ends is appended; a 200 means the server sent the whole file again, so the partial
is dropped and the download starts over cleanly; a 416 drops the partial too. The
SHA-256 of the whole file is computed as the bytes arrive (the partial's bytes first), and
`Accept-Encoding: identity` keeps it the hash of the bytes served.

Bounded: a file larger than `max_bytes` (announced or received) is refused; every read
waits at most `read_timeout`. Network errors and 5xx/408/429 answers are retried up to
`attempts` times with a growing delay; other answers are refused at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import httpx

__all__ = ["DownloadFailed", "DownloadProgress", "Downloaded", "download_file"]

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_RETRIED_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_VALIDATOR_SUFFIX = ".validator"


class DownloadFailed(Exception):
    """The file could not be downloaded; the message is reported to the server.

    `resumable`: what was received is worth resuming (the connection failed), as opposed
    to a refusal or a file over the bound.
    """

    def __init__(self, message: str, *, resumable: bool = False) -> None:
        super().__init__(message)
        self.resumable = resumable


class _Retry(Exception):
    """This attempt failed in a way another attempt may not."""


@dataclass(frozen=True)
class DownloadProgress:
    received: int
    total: int | None
    bytes_per_second: float

    @property
    def percent(self) -> float:
        if not self.total:
            return 0.0
        return min(100.0, 100.0 * self.received / self.total)


@dataclass(frozen=True)
class Downloaded:
    sha256: bytes
    size: int
    # The complete file (the partial file's path), None when the bytes were not kept.
    path: Path | None
    # Requests that resumed a partial download with a 206 answer.
    resumed: int
    # Bytes this download fetched over the network (a resumed partial's bytes not counted).
    fetched: int = 0


ProgressCallback = Callable[[DownloadProgress], Awaitable[None]]


class _Download:
    """One file's download across attempts: what is held so far and its running hash."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        url: str,
        headers: Mapping[str, str],
        partial: Path | None,
        max_bytes: int,
        on_progress: ProgressCallback,
        progress_interval: float,
    ) -> None:
        self.client = client
        self.url = url
        self.headers = dict(headers)
        self.partial = partial
        self.max_bytes = max_bytes
        self.on_progress = on_progress
        self.progress_interval = progress_interval
        self.hasher = hashlib.sha256()
        self.received = 0
        self.total: int | None = None
        self.validator: str | None = None
        self.resumed = 0
        self.out: BinaryIO | None = None
        self._started = time.monotonic()
        self._fetched = 0  # bytes fetched by this process, for the rate
        self._last_report = 0.0

    def open(self) -> None:
        """Pick up a partial download left by an earlier attempt or process."""
        if self.partial is None:
            return
        if self.partial.exists():
            with self.partial.open("rb") as existing:
                while chunk := existing.read(1 << 20):
                    self.hasher.update(chunk)
                    self.received += len(chunk)
            validator_file = self._validator_file()
            if validator_file is not None and validator_file.exists():
                self.validator = validator_file.read_text(encoding="ascii").strip() or None
            if self.received > self.max_bytes:
                self._reset_sync()
        self.out = self.partial.open("ab")

    def _validator_file(self) -> Path | None:
        return None if self.partial is None else self.partial.with_name(self.partial.name + _VALIDATOR_SUFFIX)

    def _reset_sync(self) -> None:
        self.hasher = hashlib.sha256()
        self.received = 0
        self.validator = None
        if self.out is not None:
            self.out.seek(0)
            self.out.truncate()
        elif self.partial is not None:
            self.partial.write_bytes(b"")

    def _save_validator(self, response: httpx.Response) -> None:
        etag = response.headers.get("etag")
        # A weak ETag may not be used in If-Range; Last-Modified is the fallback.
        self.validator = etag if etag and not etag.startswith("W/") else response.headers.get("last-modified")
        validator_file = self._validator_file()
        if validator_file is not None:
            if self.validator:
                validator_file.write_text(self.validator, encoding="ascii")
            else:
                with contextlib.suppress(FileNotFoundError):
                    validator_file.unlink()

    async def attempt(self) -> None:
        headers = {**self.headers, "Accept-Encoding": "identity"}
        resuming = self.received > 0
        if resuming:
            headers["Range"] = f"bytes={self.received}-"
            if self.validator:
                headers["If-Range"] = self.validator
        try:
            async with self.client.stream("GET", self.url, headers=headers) as response:
                self._start(response, resuming)
                # As the bytes arrive: a cut loses nothing already received.
                async for chunk in response.aiter_bytes():
                    await self._take(chunk)
        except httpx.TransportError as error:
            raise _Retry(f"download interrupted: {type(error).__name__}: {error}") from error
        if self.total is not None and self.received != self.total:
            raise _Retry(f"download ended at {self.received} of {self.total} bytes")

    def _start(self, response: httpx.Response, resuming: bool) -> None:
        status = response.status_code
        if resuming and status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
            if match is None or int(match.group(1)) != self.received:
                # Not the part asked for: start over without trusting the partial.
                self._reset_sync()
                raise _Retry(f"the server resumed at an unexpected range ({response.headers.get('content-range')})")
            self.total = None if match.group(3) == "*" else int(match.group(3))
            self.resumed += 1
        elif status == 200:
            # The whole file (a server without ranges, or If-Range saw another file).
            self._reset_sync()
            length = response.headers.get("content-length")
            self.total = int(length) if length and length.isdigit() else None
            self._save_validator(response)
        elif resuming and status == 416:
            self._reset_sync()
            raise _Retry("the server refused the range of the partial download; starting over")
        elif status in _RETRIED_STATUSES:
            raise _Retry(f"download refused: HTTP {status}")
        else:
            raise DownloadFailed(f"download refused: HTTP {status}")
        if self.total is not None and self.total > self.max_bytes:
            raise DownloadFailed(f"the file is {self.total} bytes, more than the {self.max_bytes} allowed")

    async def _take(self, chunk: bytes) -> None:
        self.received += len(chunk)
        self._fetched += len(chunk)
        if self.received > self.max_bytes:
            raise DownloadFailed(f"the file is more than the {self.max_bytes} bytes allowed")
        self.hasher.update(chunk)
        if self.out is not None:
            self.out.write(chunk)
        now = time.monotonic()
        if now - self._last_report >= self.progress_interval:
            self._last_report = now
            await self.on_progress(self.progress())

    def progress(self) -> DownloadProgress:
        elapsed = time.monotonic() - self._started
        rate = self._fetched / elapsed if elapsed > 0 else 0.0
        return DownloadProgress(received=self.received, total=self.total, bytes_per_second=rate)

    def finish(self) -> Downloaded:
        if self.out is not None:
            self.out.flush()
            # The bytes reach the disk before the file is installed.
            os.fsync(self.out.fileno())
        return Downloaded(
            sha256=self.hasher.digest(),
            size=self.received,
            path=self.partial,
            resumed=self.resumed,
            fetched=self._fetched,
        )

    def close(self) -> None:
        if self.out is not None:
            self.out.close()
            self.out = None


async def download_file(
    client: httpx.AsyncClient,
    *,
    url: str,
    headers: Mapping[str, str],
    partial: Path | None,
    max_bytes: int,
    attempts: int,
    retry_delay: float,
    on_progress: ProgressCallback,
    progress_interval: float,
) -> Downloaded:
    """Download `url` (to `partial`, resuming what it holds); DownloadFailed when it cannot.

    The partial file stays after a failure or a cancellation, to be resumed; the caller
    removes it once the file is installed or refused.
    """
    try:
        scheme = httpx.URL(url).scheme
    except httpx.InvalidURL:
        scheme = ""
    if scheme not in ("http", "https"):
        raise DownloadFailed(f"not an http(s) URL: {url[:100]!r}")
    download = _Download(
        client,
        url=url,
        headers=headers,
        partial=partial,
        max_bytes=max_bytes,
        on_progress=on_progress,
        progress_interval=progress_interval,
    )
    try:
        await asyncio.to_thread(download.open)
        await on_progress(download.progress())
        for attempt in range(1, attempts + 1):
            try:
                await download.attempt()
            except _Retry as error:
                if attempt == attempts:
                    raise DownloadFailed(f"{error} (after {attempts} attempts)", resumable=True) from None
                await asyncio.sleep(retry_delay * 2 ** (attempt - 1))
                continue
            break
        await on_progress(download.progress())
        return await asyncio.to_thread(download.finish)
    finally:
        download.close()
