"""The ASGI server command: daphne or uvicorn, each with the same bounds on what one client
can make a server process hold.

    python -m opamp_site.server [--server daphne|uvicorn] -b 127.0.0.1 -p 4320 opamp_site.asgi:application

`--server` (or OPAMP_ASGI_SERVER; default daphne, the design's server) picks the server; the
rest of the command line is daphne's, of which the uvicorn server takes what this project
uses (-b, -p, --fd, --ping-interval, --ping-timeout, --websocket_connect_timeout,
--proxy-headers). The production unit (deploy/systemd/opamp-server.service) and
deploy/run_production.py start uvicorn: it serves the same Channels consumers with 35-44%
less CPU per heartbeat and a few KiB less memory per connection (BENCHMARKS.md, "The ASGI
server, by measurement"). The bounds each server enforces, and how: opamp_site/daphne_server.py,
opamp_site/uvicorn_server.py; tests/e2e/test_resource_bounds.py holds both to them.

Only the chosen server is imported: daphne installs Twisted's reactor when imported.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

SERVERS = {"daphne": "opamp_site.daphne_server", "uvicorn": "opamp_site.uvicorn_server"}
DEFAULT_SERVER = "daphne"


def split_server_choice(argv: Sequence[str]) -> tuple[str, list[str]]:
    """(`--server NAME` or OPAMP_ASGI_SERVER or the default, the rest of the command line)."""
    rest = list(argv)
    name = os.environ.get("OPAMP_ASGI_SERVER") or DEFAULT_SERVER
    for index, argument in enumerate(rest):
        if argument == "--server" and index + 1 < len(rest):
            name = rest[index + 1]
            del rest[index : index + 2]
            break
        if argument.startswith("--server="):
            name = argument.partition("=")[2]
            del rest[index]
            break
    if name not in SERVERS:
        raise SystemExit(f"unknown server {name!r}: choose one of {', '.join(SERVERS)}")
    return name, rest


def main(argv: Sequence[str] | None = None) -> None:
    name, rest = split_server_choice(sys.argv[1:] if argv is None else argv)
    importlib.import_module(SERVERS[name]).main(rest)


if __name__ == "__main__":
    main()
