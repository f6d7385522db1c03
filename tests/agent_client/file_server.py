"""A small HTTP file server on 127.0.0.1 for the package tests: Range requests, If-Range, a cut.

Serves `files` (path -> bytes) with a strong ETag per content. `cut_next(n)` makes the next
response stop after `n` body bytes and close the connection, as a dropped download would.
`hold_next()` makes the next response pause after its first chunk until `release()`, so a
test can act mid-download. Every request's path and headers (lower-cased) are recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from types import TracebackType
from typing import Self

_PHRASES = {200: "OK", 206: "Partial Content", 401: "Unauthorized", 404: "Not Found", 416: "Range Not Satisfiable"}


class FileServer:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.supports_ranges = True
        self.required_headers: dict[str, str] = {}
        self._cuts: list[int] = []
        self._held = asyncio.Event()
        self._hold_next = False
        self.holding = asyncio.Event()
        self._server: asyncio.Server | None = None

    def etag(self, path: str) -> str:
        return '"' + hashlib.sha256(self.files[path]).hexdigest()[:20] + '"'

    def url(self, path: str) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}{path}"

    def cut_next(self, after: int) -> None:
        self._cuts.append(after)

    def hold_next(self) -> None:
        self._hold_next = True
        self._held.clear()
        self.holding.clear()

    def release(self) -> None:
        self._held.set()

    def requests_for(self, path: str) -> list[dict[str, str]]:
        return [headers for target, headers in self.requests if target == path]

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await reader.readline()
            if not request_line:
                return
            _, target, _ = request_line.decode("latin-1").split(" ", 2)
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            self.requests.append((target, headers))
            await self._respond(writer, target, headers)
        finally:
            with contextlib.suppress(ConnectionError):
                writer.close()
                await writer.wait_closed()

    async def _respond(self, writer: asyncio.StreamWriter, target: str, headers: dict[str, str]) -> None:
        body = self.files.get(target)
        if body is None:
            writer.write(_head(404, {"Content-Length": "0"}))
            return
        if any(headers.get(name.lower()) != value for name, value in self.required_headers.items()):
            writer.write(_head(401, {"Content-Length": "0"}))
            return
        etag = self.etag(target)
        extra = {"ETag": etag, "Accept-Ranges": "bytes"}
        start, status = 0, 200
        wanted = headers.get("range")
        if wanted and self.supports_ranges and headers.get("if-range", etag) == etag:
            start = int(wanted.removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                writer.write(_head(416, {"Content-Range": f"bytes */{len(body)}", "Content-Length": "0"}))
                return
            status = 206
            extra["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        part = body[start:]
        writer.write(_head(status, {**extra, "Content-Length": str(len(part))}))
        if self._cuts:
            writer.write(part[: self._cuts.pop(0)])
            await writer.drain()
            return  # the connection closes mid-body
        if self._hold_next:
            self._hold_next = False
            writer.write(part[:1024])
            await writer.drain()
            self.holding.set()
            await self._held.wait()
            part = part[1024:]
        writer.write(part)
        await writer.drain()


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_PHRASES[status]}", *(f"{k}: {v}" for k, v in headers.items()), "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
