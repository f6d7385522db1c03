"""A stand-in for daphne behind nginx: echoes what it received, over HTTP and WebSocket.

Plain HTTP: answers every request with JSON {method, path, headers, body_bytes}, headers
as [name, value] pairs in the order received (so a duplicated header shows twice).
WebSocket (an Upgrade request): completes the handshake, sends the same JSON as its first
text message, then echoes every message back until the client closes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA


class EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: EchoServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _received(self, body_bytes: int) -> dict[str, Any]:
        seen = {
            "method": self.command,
            "path": self.path,
            "headers": [[name, value] for name, value in self.headers.items()],
            "body_bytes": body_bytes,
        }
        with self.server.lock:
            self.server.requests.append(seen)
        return seen

    def _handle(self) -> None:
        if self.headers.get("Upgrade", "").lower() == "websocket":
            self._websocket()
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        payload = json.dumps(self._received(len(body))).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = _handle

    # --- WebSocket (RFC 6455, just enough for an echo) ------------------------------------

    def _websocket(self) -> None:
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + WEBSOCKET_GUID).encode()).digest()).decode()
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        self._send_frame(OP_TEXT, json.dumps(self._received(0)).encode())
        while True:
            opcode, payload = self._read_frame()
            if opcode == OP_CLOSE:
                self._send_frame(OP_CLOSE, payload[:2])
                return
            if opcode == OP_PING:
                self._send_frame(OP_PONG, payload)
            elif opcode in (OP_TEXT, OP_BINARY):
                self._send_frame(opcode, payload)

    def _read_exactly(self, count: int) -> bytes:
        data = self.rfile.read(count)
        if len(data) != count:
            raise ConnectionError("the WebSocket closed mid-frame")
        return data

    def _read_frame(self) -> tuple[int, bytes]:
        first, second = self._read_exactly(2)
        if not first & 0x80:
            raise ConnectionError("fragmented WebSocket messages are not part of this echo")
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._read_exactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._read_exactly(8))
        mask = self._read_exactly(4) if second & 0x80 else b"\0\0\0\0"
        payload = bytes(byte ^ mask[index % 4] for index, byte in enumerate(self._read_exactly(length)))
        return first & 0x0F, payload

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        header = bytes([0x80 | opcode])
        if len(payload) < 126:
            header += bytes([len(payload)])
        elif len(payload) < 1 << 16:
            header += bytes([126]) + struct.pack("!H", len(payload))
        else:
            header += bytes([127]) + struct.pack("!Q", len(payload))
        self.wfile.write(header + payload)
        self.wfile.flush()


class EchoServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), EchoHandler)
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self.serve_forever, name="nginx-test-upstream", daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def start(self) -> EchoServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)

    def received_paths(self) -> list[str]:
        with self.lock:
            return [request["path"] for request in self.requests]


def header_values(seen: dict[str, Any], name: str) -> list[str]:
    """Every value the upstream received for `name` (case-insensitive)."""
    return [value for key, value in seen["headers"] if key.lower() == name.lower()]
