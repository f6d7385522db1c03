"""Unauthenticated large POSTs against a live server: the server process's resident memory.

    .venv/bin/python bench/body_flood.py [--requests 12] [--mib 60]

Starts one server process (tests/support/live_server.py) with OPAMP_AGENT_AUTH=required,
sends N concurrent POST /v1/opamp of M MiB each without a credential, and prints the
process's RSS before, right after, and 5 s after, with the statuses the senders saw.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.live_server import LiveOpampServer


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def post(port: int, size: int, statuses: list[str]) -> None:
    chunk = b"\x00" * (1024 * 1024)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(
                b"POST /v1/opamp HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
                b"Content-Length: %d\r\n\r\n" % size
            )
            sent = 0
            try:
                while sent < size:
                    sock.sendall(chunk)
                    sent += len(chunk)
            except OSError:
                pass
            head = sock.recv(200).split(b"\r\n", 1)[0]
            statuses.append(f"{head.decode(errors='replace')} after {sent // (1024 * 1024)} MiB sent")
    except OSError as error:
        statuses.append(f"error: {error!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--mib", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        server = LiveOpampServer(Path(workdir), extra_env={"OPAMP_AGENT_AUTH": "required"})
        try:
            server.start()
            assert server.process is not None
            pid = server.process.pid
            time.sleep(2)
            before = rss_mib(pid)
            statuses: list[str] = []
            threads = [
                threading.Thread(target=post, args=(server.port, args.mib * 1024 * 1024, statuses))
                for _ in range(args.requests)
            ]
            started = time.monotonic()
            peak = before
            for thread in threads:
                thread.start()
            while any(thread.is_alive() for thread in threads):
                peak = max(peak, rss_mib(pid))
                time.sleep(0.05)
            elapsed = time.monotonic() - started
            after = rss_mib(pid)
            time.sleep(5)
            later = rss_mib(pid)
            print(f"{args.requests} x {args.mib} MiB POST without a credential, {elapsed:.1f} s")
            print(f"RSS before {before:.0f} MiB, peak {peak:.0f} MiB, after {after:.0f} MiB, 5 s later {later:.0f} MiB")
            for status in sorted(set(statuses)):
                print(f"  {statuses.count(status)} x {status}")
        finally:
            server.close()


if __name__ == "__main__":
    main()
