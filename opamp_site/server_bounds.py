"""What the servers answer when a request's headers or body do not arrive in time.

Shared by both ASGI servers (opamp_site/daphne_server.py, opamp_site/uvicorn_server.py), so a
client sees the same 408 whichever serves it.
"""

from __future__ import annotations

HEADERS_TIMED_OUT = b"request headers not received in time\n"
BODY_TIMED_OUT = b"request body not received in time\n"


def timeout_response(message: bytes) -> bytes:
    return (
        b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(message), message)
    )
