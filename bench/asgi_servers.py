"""The same Channels application under each ASGI server, and the floor, measured alike.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/asgi_bench REDIS_URL=redis://127.0.0.1:6379/5 \\
        .venv/bin/python bench/asgi_servers.py --rounds 2 --agents 2000 --out asgi.jsonl

For each round, for each server in `--servers` (order alternated between rounds): start the
server pinned to core 0 (`taskset -c 0`), production settings, agents without credentials;
run `bench/agents_connect.py` pinned to core 1 with `--server-pid`; stop the server. Each
result is one JSON line with the server's name, its command, the load average before and
after (`/proc/loadavg`: the machine may be shared) and agents_connect's summary.
`NAME@baseline` runs server NAME from `--baseline-root` (a tree of an earlier commit), for
before/after pairs. `--summarize FILE` prints per server each run's figures, their medians
and the medians' ratios to the floor's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
APP = "opamp_site.asgi:application"
LISTEN_TIMEOUT = 60.0


def server_commands(port: int) -> dict[str, list[str]]:
    """Each server's command line, listening on 127.0.0.1:port."""
    host = ["127.0.0.1"]
    uvicorn = [PYTHON, "-m", "uvicorn", "--host", *host, "--port", str(port), "--no-access-log"]
    uvicorn += ["--log-level", "warning", "--ws-ping-interval", "60", "--ws-ping-timeout", "60"]
    uvicorn += ["--ws-per-message-deflate", "false", "--lifespan", "off"]
    # The production unit's options (deploy/systemd/opamp-server.service), for both servers.
    bounded = ["--ping-interval", "60", "--ping-timeout", "60", "--websocket_connect_timeout", "30", APP]
    opamp = [PYTHON, "-m", "opamp_site.server", "--server"]
    granian = [PYTHON, "-m", "granian", "--interface", "asgi", "--host", *host, "--port", str(port)]
    return {
        "floor": [PYTHON, "bench/floor_server.py", "--port", str(port)],
        "daphne": [*opamp, "daphne", "-b", *host, "-p", str(port), *bounded],
        "uvicorn": [*uvicorn, "--loop", "asyncio", "--http", "h11", "--ws", "websockets", APP],
        "uvicorn-uvloop": [*uvicorn, "--loop", "uvloop", "--http", "httptools", "--ws", "websockets", APP],
        "uvicorn-sansio": [*uvicorn, "--loop", "uvloop", "--http", "httptools", "--ws", "websockets-sansio", APP],
        "opamp-uvicorn": [*opamp, "uvicorn", "-b", *host, "-p", str(port), *bounded],
        # The same with glibc's malloc held to two arenas (each thread of the database pool
        # otherwise allocates from an arena of its own).
        "opamp-uvicorn-arenas2": [
            "env",
            "MALLOC_ARENA_MAX=2",
            *opamp,
            "uvicorn",
            "-b",
            *host,
            "-p",
            str(port),
            *bounded,
        ],
        "granian": [
            *granian,
            "--workers",
            "1",
            "--runtime-threads",
            "1",
            "--loop",
            "uvloop",
            "--ws",
            "--no-access-log",
            APP,
        ],
    }


def wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + LISTEN_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {port} after {LISTEN_TIMEOUT} s")


def serving_pid(pid: int) -> int:
    """The process that holds the sockets: granian serves from a worker child."""
    children_file = Path(f"/proc/{pid}/task/{pid}/children")
    children = [int(child) for child in children_file.read_text().split()] if children_file.exists() else []
    return children[0] if children else pid


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_one(
    name: str, command: list[str], port: int, bench_args: list[str], log_dir: Path, root: Path = REPO_ROOT
) -> dict[str, Any]:
    log = (log_dir / f"{name}.log").open("ab")
    server = subprocess.Popen(["taskset", "-c", "0", *command], cwd=root, stdout=log, stderr=log)
    try:
        wait_listening(port, server)
        time.sleep(1.0)  # granian's worker binds through its parent; let it settle
        pid = serving_pid(server.pid)
        load_before = load_average()
        generator = ["taskset", "-c", "1", PYTHON, "bench/agents_connect.py"]
        bench = subprocess.run(
            [*generator, "--server", f"ws://127.0.0.1:{port}/v1/opamp", "--server-pid", str(pid), *bench_args],
            cwd=REPO_ROOT,
            capture_output=True,
            check=False,
        )
        load_after = load_average()
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    try:
        summary = json.loads(bench.stdout)
    except json.JSONDecodeError:
        summary = {"error": bench.stderr.decode(errors="replace")[-2000:]}
    return {
        **summary,
        "url": summary.get("server"),
        "server": name,
        "command": " ".join(command),
        "load_before": load_before,
        "load_after": load_after,
        "at": time.strftime("%H:%M:%S", time.gmtime()),
    }


MEASURES = {
    "us_per_heartbeat": lambda r: r["server_cpu_us_per_heartbeat"],
    "ms_per_connect": lambda r: r["server_process"]["cpu_ms_per_connect"],
    "kib_per_connection": lambda r: r["server_process"]["kib_per_connection"],
    "rtt_p50_ms": lambda r: r["latency_ms"]["p50"],
    "rtt_p99_ms": lambda r: r["latency_ms"]["p99"],
    "rtt_p999_ms": lambda r: r["latency_ms"]["p99.9"],
}


def summarize(path: Path) -> dict[str, dict[str, Any]]:
    """Per server: each run's figures, their medians and the medians' ratios to the floor's."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for line in path.read_text().splitlines():
        result = json.loads(line)
        if result.get("latency_ms") and result.get("server_process"):
            runs.setdefault(result["server"], []).append(result)
    rows: dict[str, dict[str, Any]] = {}
    for name, results in runs.items():
        values = {measure: [read(r) for r in results] for measure, read in MEASURES.items()}
        rows[name] = {
            "runs": values,
            "median": {measure: round(statistics.median(v), 2) for measure, v in values.items()},
            "load": [f"{r['load_before']} -> {r['load_after']}" for r in results],
            "reconnects": [r["reconnects"] for r in results],
            "replies_per_second": [r["replies_per_second"] for r in results],
        }
    if "floor" in rows:
        floor = rows["floor"]["median"]
        for row in rows.values():
            row["to_floor"] = {
                measure: round(value / floor[measure], 2) if floor[measure] else None
                for measure, value in row["median"].items()
            }
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="floor,daphne,uvicorn,uvicorn-uvloop,granian")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port", type=int, default=4340)
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--heartbeat", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--connect-rate", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=Path("asgi_servers.jsonl"))
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/asgi_servers_logs"))
    parser.add_argument("--summarize", type=Path, help="print the medians of a results file and exit")
    parser.add_argument(
        "--baseline-root",
        type=Path,
        help="a source tree (e.g. `git archive` of the previous commit): SERVER@baseline runs from it",
    )
    options = parser.parse_args(argv)
    if options.summarize:
        print(json.dumps(summarize(options.summarize), indent=1))
        return 0
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "opamp_site.settings.production")
    os.environ.setdefault("OPAMP_AGENT_AUTH", "open")
    os.environ.setdefault("DJANGO_ALLOWED_HOSTS", "127.0.0.1")
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-" + "x" * 50)
    options.log_dir.mkdir(parents=True, exist_ok=True)
    names = options.servers.split(",")
    bench_args = ["--agents", str(options.agents), "--heartbeat", str(options.heartbeat)]
    bench_args += ["--duration", str(options.duration), "--connect-rate", str(options.connect_rate)]
    bench_args += ["--connect-timeout", str(options.agents / options.connect_rate + 60)]
    for round_index in range(options.rounds):
        order = names if round_index % 2 == 0 else list(reversed(names))
        for name in order:
            server, _, tree = name.partition("@")
            command = server_commands(options.port)[server]
            root = options.baseline_root if tree == "baseline" and options.baseline_root else REPO_ROOT
            result = run_one(name, command, options.port, bench_args, options.log_dir, root.absolute())
            with options.out.open("a") as out:
                out.write(json.dumps(result) + "\n")
            latency = result.get("latency_ms") or {}
            print(
                f"{result['at']} {name}: load {result['load_before']} -> {result['load_after']}, "
                f"{result.get('server_cpu_us_per_heartbeat')} us/heartbeat, "
                f"{(result.get('server_process') or {}).get('cpu_ms_per_connect')} ms/connect, "
                f"{(result.get('server_process') or {}).get('kib_per_connection')} KiB/conn, "
                f"p50 {latency.get('p50')} p99 {latency.get('p99')} p99.9 {latency.get('p99.9')} ms, "
                f"reconnects {result.get('reconnects')} {result.get('error', '')[:300]}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
