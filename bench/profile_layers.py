"""Split a py-spy profile of a server process by layer (ASGI server, Channels, ORM, ...).

    py-spy record --pid PID --format raw --output storm.txt --gil  # or bench/restart_storm.py --profile
    python bench/profile_layers.py storm.txt

Each sample is charged to the layer of its innermost frame (where the CPU was), except that
samples inside the event loop's selector (epoll) count as idle, and a frame of the project's
own code charges a sample to "project" only when no library frame lies below it. Prints one
JSON object: samples per layer, as counts and as shares of the busy (non-idle) samples, and
the ten heaviest innermost project frames.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

# (layer, pattern on a frame's "function (file:line)" text); the first match wins.
LAYERS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern))
    for name, pattern in (
        ("idle (epoll)", r"\b(select|poll|_poll|doPoll|epoll)\b.*(selectors|epollreactor|asyncio)"),
        ("protobuf", r"[(/]google/(protobuf|_upb)|_pb2\.py"),
        ("psycopg", r"[(/]psycopg(_pool|_binary)?/"),
        ("ORM (django.db)", r"[(/]django/db/"),
        ("django (other)", r"[(/]django/"),
        ("Channels", r"[(/]channels(_redis)?/"),
        ("redis", r"[(/]redis/"),
        ("uvicorn (HTTP, WebSocket handshake and sends)", r"[(/]uvicorn/"),
        ("websockets (handshake, framing)", r"[(/]websockets/"),
        ("httptools", r"[(/]httptools/"),
        ("daphne", r"[(/]daphne/"),
        ("autobahn (WebSocket framing)", r"[(/](autobahn|txaio)/"),
        ("Twisted", r"[(/]twisted/"),
        ("asgiref (sync/async hops)", r"[(/]asgiref/"),
        ("asyncio", r"[(/]asyncio/"),
        ("threads and queues", r"[(/](threading|queue|concurrent/futures/\w+)\.py"),
        ("logging", r"[(/]logging/"),
        ("project: fleet", r"(^|[ (/])fleet/"),
        ("project: rollouts", r"(^|[ (/])rollouts/"),
        ("project: signing", r"(^|[ (/])signing/"),
        ("project: opamp", r"(^|[ (/])opamp/"),
        ("project: opamp_site (the server's bounds)", r"(^|[ (/])opamp_site/"),
        (
            "stdlib: json, uuid, datetime, copy, ipaddress, email",
            r"[(/](json|uuid|datetime|copy|_strptime|dataclasses|pprint|hashlib|ipaddress|email)(/|\.py)",
        ),
    )
)
PROJECT = re.compile(r"(^|[ (/])(fleet|rollouts|signing|opamp|opamp_site)/")


def layer_of(frame: str) -> str | None:
    for name, pattern in LAYERS:
        if pattern.search(frame):
            return name
    return None


def classify(stack: Sequence[str]) -> str:
    """The layer of the innermost frame that names one (stack: outermost first)."""
    for frame in reversed(stack):
        if "(" not in frame:
            continue  # thread and process names py-spy puts first
        layer = layer_of(frame)
        if layer is not None:
            return layer
    return "other (stdlib, interpreter)"


def samples(lines: Iterable[str]) -> Iterable[tuple[list[str], int]]:
    """py-spy's raw format: collapsed stacks, frames joined by ';', a count at the end."""
    for line in lines:
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        if count.isdigit():
            yield stack.split(";"), int(count)


def split(lines: Iterable[str]) -> dict[str, object]:
    layers: Counter[str] = Counter()
    project_frames: Counter[str] = Counter()
    for stack, count in samples(lines):
        layer = classify(stack)
        layers[layer] += count
        if layer.startswith("project"):
            innermost = next(frame for frame in reversed(stack) if PROJECT.search(frame))
            project_frames[innermost] += count
    total = sum(layers.values())
    busy = total - layers["idle (epoll)"]
    return {
        "samples": total,
        "idle_share": round(layers["idle (epoll)"] / total, 3) if total else None,
        "busy_samples": busy,
        "busy_share_by_layer": {
            name: round(count / busy, 3) for name, count in layers.most_common() if name != "idle (epoll)" and busy
        },
        "samples_by_layer": dict(layers.most_common()),
        "heaviest_project_frames": dict(project_frames.most_common(10)),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path, help="py-spy record --format raw output")
    options = parser.parse_args(argv)
    with options.profile.open(encoding="utf-8", errors="replace") as lines:
        print(json.dumps(split(lines), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
