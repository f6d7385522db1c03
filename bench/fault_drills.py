"""Fault drills: a fault injected with N agents connected and a rollout running, then the
invariants checked from the database and the agents.

    python bench/fault_drills.py --drill redis      # Redis stopped for --outage seconds (60)
    python bench/fault_drills.py --drill postgres   # PostgreSQL stopped (fast) and started again
    python bench/fault_drills.py --drill celery     # the Celery worker SIGKILLed mid-stage
    python bench/fault_drills.py --drill server     # every server process SIGKILLed
    python bench/fault_drills.py --drill all        # the four, one after another

Each drill starts everything it faults itself: a PostgreSQL cluster of its own (initdb into
a temporary directory, run as the `postgres` OS user when started by root) and a
redis-server of its own, each on a free port, so stopping them never touches a database
anyone else uses. On them it starts the production profile as processes through
`deploy/run_production.py` (`--processes` server processes without nginx, a Celery worker,
Celery beat; whatever exits is started again after a second, as run_production.py and
systemd's Restart= do), connects `--agents` simulated agents (agent_client's simulator),
publishes a stable version and starts a rollout 1% -> 10% -> 100% with compressed holds.
Once the 10% stage has started it injects the fault. Meanwhile an operator probe asks the
REST API for the rollout every second and records what it answered.

Afterwards, once the rollout ended and the fleet settled (or `--settle-timeout` passed):

- every agent answered after the fault, on a live session;
- each agent's desired version is the resolver's answer now (`computed_assignments`, the
  reconciler's check), the stored assignment agrees, and the agent runs it (reports its
  hash as APPLIED; a failing agent reports it FAILED); the server stores that report;
- the rollout ended in the state the drill expects (succeeded, or rolled back when the
  failing share exceeds the budget), and no transition happened twice (RolloutEvent rows:
  each kind once per stage, the stages started in order);
- no status report was lost: every agent counts the status reports it sent (messages
  carrying remote_config_status: full reports and the APPLYING/APPLIED/FAILED answers) and
  those the server acknowledged (a reply, not an UNAVAILABLE refusal, came back for it on
  the same connection). The server's stored remote config status of every agent equals
  the agent's last acknowledged one, and every rollout target holds the agent's answer
  for the candidate. The counts at the fault and at the end are printed.

Prints a summary (and `--output` writes it as JSON); exit status 1 when an invariant fails.
Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from agents_connect import raise_open_file_limit  # noqa: E402

from agent_client.agent import Agent  # noqa: E402
from agent_client.agent_settings import AgentSettings  # noqa: E402
from agent_client.simulator import Fleet, FleetStats, spread_evenly  # noqa: E402
from deploy.run_production import DEFAULT_SERVER, ProductionProfile, ProfileOptions  # noqa: E402
from opamp.proto import opamp_pb2 as pb  # noqa: E402

DRILLS = ("redis", "postgres", "celery", "server")
MARKER = b"drill-candidate"
STABLE = {"collector.yaml": {"body": "receivers:\n  otlp: {}\n", "content_type": "text/yaml"}}
CANDIDATE = {"collector.yaml": {"body": "# drill-candidate\nreceivers:\n  otlp: {}\n", "content_type": "text/yaml"}}
# Kinds of RolloutEvent that mark a transition: each may happen once per stage at most.
TRANSITIONS = ("started", "stage_started", "succeeded", "budget_exceeded", "rollback_started", "rolled_back")
TERMINAL = {"succeeded", "rolled_back", "aborted"}


def log(text: str) -> None:
    print(f"{datetime.now(UTC):%H:%M:%S} {text}", file=sys.stderr, flush=True)


def free_port(count: int = 1) -> int:
    """The first of `count` consecutive free loopback ports."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            first = int(sock.getsockname()[1])
        if first + count > 65535:
            continue
        try:
            held = []
            for port in range(first, first + count):
                probe = socket.socket()
                held.append(probe)
                probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for probe in held:
                probe.close()
        return first
    raise RuntimeError("no free ports")


def wait_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
        time.sleep(0.1)
    return False


# -- the services the drills fault: the drill's own ---------------------------------------


class OwnPostgres:
    """A PostgreSQL cluster of the drill's own in `root`, on a free port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.logfile = root / "postgres.log"
        self.port = free_port()
        self.bin = self._find_bin()
        # initdb refuses to run as root: the cluster belongs to `postgres` then.
        self.user = "postgres" if os.geteuid() == 0 else None

    @staticmethod
    def _find_bin() -> Path:
        if found := shutil.which("pg_ctl"):
            return Path(found).parent
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
        if not versions:
            raise RuntimeError("PostgreSQL's server binaries (pg_ctl, initdb) are not installed")
        return versions[-1].parent

    def _run(self, *args: str, timeout: float = 120) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        # fsync off: the drills restart PostgreSQL cleanly (a fast shutdown writes a
        # checkpoint), they do not crash the machine; it keeps the loaded disk out of it.
        settings = (
            f"port = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.root}'\n"
            "max_connections = 200\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
            "shared_buffers = 128MB\n"
        )
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(settings)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "120", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "120", "stop")

    def url(self, database: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")


class OwnRedis:
    """A redis-server of the drill's own on a free port, without persistence."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server is not installed")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        log_file = (self.root / "redis.log").open("ab")
        assert self.binary is not None
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.root)],
            stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log_file.close()
        if not wait_port(self.port, 30):
            raise RuntimeError(f"redis-server did not listen on {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"


# -- the server: deploy/run_production.py's profile, supervised as it supervises it -------


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found


class SupervisedProfile:
    """ProductionProfile plus run_production.py's loop (start again what exited, every
    second) in a thread; faults are injected under the same lock."""

    def __init__(self, profile: ProductionProfile) -> None:
        self.profile = profile
        self.lock = threading.Lock()
        self.restarts: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)

    def start(self) -> None:
        self.profile.start()
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            with self.lock:
                try:
                    for name in self.profile.supervise_once():
                        self.restarts.append((time.time(), name))
                        log(f"{name} exited; started it again")
                except Exception as error:  # a start that failed is tried again next second
                    log(f"supervisor: {error}")

    def kill(self, names: set[str]) -> list[str]:
        """SIGKILL the named processes ("server", "celery-worker", "celery-beat") and their children."""
        killed = []
        with self.lock:
            targets: list[tuple[str, subprocess.Popen[bytes]]] = []
            if "server" in names:
                targets += [(f"server-{i}", p) for i, p in enumerate(self.profile.servers) if p is not None]
            targets += [(name, p) for name, p in self.profile.others.items() if name in names]
            for name, process in targets:
                if process.poll() is not None:
                    continue
                pids = [process.pid, *children_of(process.pid)]
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                process.wait()
                killed.append(f"{name} (pids {', '.join(map(str, pids))})")
        return killed

    def all_running(self) -> bool:
        with self.lock:
            servers = all(p is not None and p.poll() is None for p in self.profile.servers)
            others = all(p.poll() is None for p in self.profile.others.values())
            return servers and others

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=90)
        with self.lock:
            self.profile.stop()


# -- the agents: what each sent and had acknowledged --------------------------------------


@dataclass
class Ledger:
    """One agent's status reports: sent, acknowledged, and the last of each."""

    sent: int = 0
    acked: int = 0
    last_sent: tuple[str, int] | None = None
    last_acked: tuple[str, int] | None = None
    session_sent: int = 0
    session_replies: int = 0
    pending: deque[tuple[int, tuple[str, int]]] = field(default_factory=deque)
    sessions: int = 0
    last_reply_at: float = 0.0

    def new_session(self) -> None:
        self.sessions += 1
        self.session_sent = self.session_replies = 0
        self.pending.clear()

    def on_send(self, message: pb.AgentToServer) -> None:
        self.session_sent += 1
        if message.HasField("remote_config_status"):
            status = message.remote_config_status
            value = (status.last_remote_config_hash.hex(), int(status.status))
            self.sent += 1
            self.last_sent = value
            self.pending.append((self.session_sent, value))

    def on_reply(self, reply: pb.ServerToAgent) -> None:
        # The server answers a connection's messages one at a time, in order: the n-th
        # reply of a session answers its n-th message. A push between answers makes this
        # count a message as answered one reply early; no drill pushes anything but
        # config hints, which only come with offers the agent answers anyway.
        self.session_replies += 1
        refused = reply.HasField("error_response")
        while self.pending and self.pending[0][0] <= self.session_replies:
            _, value = self.pending.popleft()
            if not refused:
                self.acked += 1
                self.last_acked = value
        if not refused:
            self.last_reply_at = time.time()


class DrillStats(FleetStats):
    def __init__(self, expected: int) -> None:
        super().__init__(expected)
        self.ledgers: dict[Agent, Ledger] = {}
        self.session_errors: Counter[str] = Counter()

    def watch(self, agent: Agent) -> None:
        ledger = self.ledgers[agent] = Ledger()
        transport = agent.transport
        send = transport.send

        async def counted_send(message: pb.AgentToServer) -> None:
            ledger.on_send(message)
            await send(message)

        transport.send = counted_send  # type: ignore[method-assign]

    def on_connected(self, agent: Agent) -> None:
        super().on_connected(agent)
        self.ledgers[agent].new_session()

    def on_reply(self, agent: Agent, reply: pb.ServerToAgent, round_trip: float | None) -> None:
        super().on_reply(agent, reply, round_trip)
        self.ledgers[agent].on_reply(reply)

    def on_disconnected(self, agent: Agent, error: Exception, retry_in: float) -> None:
        super().on_disconnected(agent, error, retry_in)
        self.session_errors[str(error)[:100]] += 1


# -- the operator: the REST API every second ----------------------------------------------


@dataclass
class Probe:
    at: float
    status: int | None  # None: no HTTP answer (refused, timed out)
    latency: float
    error: str = ""
    marker: str = ""  # what a write wrote, to find it in the database afterwards


class OperatorProbe:
    """GET one API path every `interval` seconds in a thread of its own (so the agents'
    event loop does not delay it), recording status, latency and error bodies."""

    def __init__(self, base: str, token: str, interval: float = 1.0) -> None:
        self.base = base
        self.token = token
        self.interval = interval
        self.path = "agents/?limit=1"
        self.probes: list[Probe] = []
        self.last_body: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="operator-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        headers = {"Authorization": f"Token {self.token}"}
        # Longer than the server takes to give up (its pool waits 10 s): what it answers is seen.
        with httpx.Client(base_url=self.base, headers=headers, timeout=30.0) as client:
            while not self._stop.is_set():
                started = time.time()
                marker = f"probe-{len(self.probes)}"
                try:
                    response = self._request(client, marker)
                    probe = Probe(started, response.status_code, time.time() - started, marker=marker)
                    if response.status_code >= 400:
                        probe.error = response.text[:300]
                    else:
                        self.last_body = response.json()
                except httpx.HTTPError as error:
                    failure = f"{type(error).__name__}: {error}"[:300]
                    probe = Probe(started, None, time.time() - started, failure, marker=marker)
                self.probes.append(probe)
                self._stop.wait(max(0.0, self.interval - (time.time() - started)))

    def _request(self, client: httpx.Client, marker: str) -> httpx.Response:
        return client.get(self.path)

    def summary(self, since: float, until: float) -> dict[str, Any]:
        window = [p for p in self.probes if since <= p.at < until]
        if not window:
            return {"probes": 0}
        answers = Counter("no answer" if p.status is None else str(p.status) for p in window)
        latencies = sorted(p.latency for p in window)
        failing = [p for p in window if not ok_status(p.status)]
        errors = Counter(p.error.splitlines()[0][:160] if p.error else "" for p in failing)
        # A failing stretch lasts from its first failed probe to the next answered one.
        longest, longest_at, run_start = 0.0, None, None
        for probe in [*window, Probe(until, 200, 0.0)]:
            if not ok_status(probe.status):
                run_start = probe.at if run_start is None else run_start
            elif run_start is not None:
                if probe.at - run_start > longest:
                    longest, longest_at = probe.at - run_start, run_start
                run_start = None
        return {
            "probes": len(window),
            "answers": dict(answers),
            "latency_ms": {
                "p50": round(statistics.median(latencies) * 1000),
                "p99": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000),
                "max": round(latencies[-1] * 1000),
            },
            "longest_failing_stretch_seconds": round(longest, 1),
            "longest_failing_stretch_from": round(longest_at - since, 1) if longest_at else None,
            "errors": dict(errors.most_common(4)),
        }


def ok_status(status: int | None) -> bool:
    return status is not None and 200 <= status < 300


class OperatorPublishes(OperatorProbe):
    """The operator's writes: every `interval` seconds a new version of a configuration that
    selects no agent (so the drilled rollout is untouched), its file naming the probe, so
    that afterwards every publish the API acknowledged can be looked for in the database."""

    def __init__(self, base: str, token: str, configuration: str, interval: float = 5.0) -> None:
        super().__init__(base, token, interval)
        self.configuration = configuration

    def _request(self, client: httpx.Client, marker: str) -> httpx.Response:
        files = {"probe.yaml": {"body": f"# {marker}\n", "content_type": "text/yaml"}}
        return client.post(f"configurations/{self.configuration}/versions/", json={"files": files})


# -- the database's view (Django, read only) ----------------------------------------------


def setup_django(env: dict[str, str]) -> None:
    """Django with the server's settings and database, without the connection pool (the
    drill restarts PostgreSQL under it: a plain connection per check is simpler)."""
    keys = ["DJANGO_SETTINGS_MODULE", "DATABASE_URL", "REDIS_URL", "DJANGO_SECRET_KEY", "DJANGO_ALLOWED_HOSTS"]
    keys += ["OPAMP_VAR_DIR", "OPAMP_CA_CERT_FILE", "OPAMP_CA_KEY_FILE", "OPAMP_CRL_FILE", "OPAMP_AGENT_AUTH"]
    for key in keys:
        if key in env:
            os.environ[key] = env[key]
    import django
    from django.conf import settings

    settings.DATABASES["default"].setdefault("OPTIONS", {}).pop("pool", None)
    django.setup()
    # The server's logging settings would print every probe and every agent's goodbye.
    # (the agents' own reconnect warnings too: the drill counts those itself).
    for name in ("httpx", "agent_client", "websockets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def database_view(uids: list[str], rollout_id: int | None) -> dict[str, Any]:
    """What the database says, read once: each agent's row, stored and computed desired
    version, the rollout, its events and targets."""
    from django.db import connection, connections, transaction

    try:
        # One snapshot for every read below: rows, targets and events of the same moment.
        with transaction.atomic():
            connection.cursor().execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            return _read_view(uids, rollout_id)
    finally:
        connections.close_all()


def _read_view(uids: list[str], rollout_id: int | None) -> dict[str, Any]:
    from fleet.models import Agent as AgentRow
    from rollouts.desired_state import computed_assignments, stored_assignments
    from rollouts.models import ConfigVersion, Rollout, RolloutEvent, RolloutTarget

    rows = list(
        AgentRow.objects.filter(instance_uid__in=uids).values_list(
            "pk", "instance_uid", "labels", "remote_config_hash", "remote_config_state", "connected"
        )
    )
    ids = [row[0] for row in rows]
    computed = computed_assignments([(pk, uid, labels) for pk, uid, labels, *_ in rows])
    stored = stored_assignments(ids)
    hashes = dict(ConfigVersion.objects.values_list("pk", "config_hash"))
    agents = {}
    for pk, uid, _labels, reported_hash, state, connected in rows:
        want = computed.get(pk)
        agents[str(uid)] = {
            "id": pk,
            "reported": (reported_hash, state),
            "connected": connected,
            "desired_hash": hashes[want[1]] if want else "",
            "stored_matches_resolver": stored.get(pk) == want,
        }
    view: dict[str, Any] = {"agents": agents}
    if rollout_id is not None:
        rollout = Rollout.objects.get(pk=rollout_id)
        view["rollout"] = {"state": rollout.state, "stage_index": rollout.stage_index}
        view["events"] = list(
            RolloutEvent.objects.filter(rollout_id=rollout_id)
            .order_by("at", "pk")
            .values_list("kind", "stage_index", "at")
        )
        view["targets"] = {
            agent_id: (answer, reverted is not None)
            for agent_id, answer, reverted in RolloutTarget.objects.filter(rollout_id=rollout_id).values_list(
                "agent_id", "answer", "reverted_at"
            )
        }
    return view


def stored_markers(configuration: str) -> set[str]:
    """The probe markers of the versions stored for the operator's write probe."""
    from django.db import connections

    from rollouts.models import ConfigVersion

    try:
        bodies = ConfigVersion.objects.filter(configuration__name=configuration).values_list("files", flat=True)
        return {str(files["probe.yaml"]["body"]).strip("# \n") for files in bodies if "probe.yaml" in files}
    finally:
        connections.close_all()


def check_writes(probes: list[Probe], stored: set[str]) -> dict[str, Any]:
    """Every publish the API acknowledged is stored; what became of the others is reported."""
    acknowledged = [p.marker for p in probes if ok_status(p.status)]
    missing = [marker for marker in acknowledged if marker not in stored]
    refused = [p for p in probes if not ok_status(p.status)]
    stored_anyway = [p.marker for p in refused if p.marker in stored]
    return {
        "ok": not missing,
        "detail": f"{len(acknowledged)} publishes acknowledged, all stored unless listed; {len(refused)} not "
        f"acknowledged, of which {len(stored_anyway)} stored anyway",
        "failures": len(missing),
        "examples": missing[:5],
    }


# -- the drill -----------------------------------------------------------------------------


@dataclass
class Timeline:
    origin: float = field(default_factory=time.time)
    marks: list[tuple[str, float]] = field(default_factory=list)

    def mark(self, what: str, at: float | None = None) -> None:
        at = time.time() if at is None else at
        self.marks.append((what, at))
        log(f"+{at - self.origin:6.1f} s  {what}")

    def at(self, what: str) -> float | None:
        return next((t for name, t in self.marks if name == what), None)

    def as_list(self) -> list[dict[str, Any]]:
        return [
            {
                "what": name,
                "at": datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S"),
                "seconds": round(t - self.origin, 1),
            }
            for name, t in self.marks
        ]


async def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return False


class Drill:
    def __init__(self, options: argparse.Namespace, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.timeline = Timeline()
        self.postgres = OwnPostgres(workdir / "postgres")
        self.redis = OwnRedis(workdir / "redis")
        self.failing = spread_evenly(options.agents, options.failing) if options.failing else set()
        self.service = f"drill-{secrets.token_hex(3)}"
        self.server: SupervisedProfile | None = None
        self.api_base = ""
        self.token = ""
        self.uids: list[str] = []
        self.rollout_id: int | None = None
        self.right_after_fault: dict[str, Any] | None = None
        self.acked_at_fault: dict[Agent, tuple[str, int] | None] = {}
        self.stats: DrillStats | None = None

    # -- set-up ------------------------------------------------------------------------

    def start_services(self) -> None:
        self.postgres.init()
        self.postgres.start()
        self.postgres.create_database("opamp_drill")
        self.redis.start()
        processes = self.options.processes
        profile = ProductionProfile(
            ProfileOptions(
                database_url=self.postgres.url("opamp_drill"),
                redis_url=self.redis.url(0),
                workdir=self.workdir / "profile",
                processes=processes,
                first_port=free_port(processes),
                server_root=self.options.server_root,
                server=self.options.server,
                nginx=False,
                celery=True,
                extra_env={
                    "OPAMP_AGENT_AUTH": "open",
                    "OPAMP_ROLLOUT_TICK_SECONDS": "1",
                    "OPAMP_HEARTBEAT_INTERVAL_SECONDS": str(self.options.heartbeat),
                    "OPAMP_LOG_LEVEL": "WARNING",
                    "DJANGO_SECURE_COOKIES": "0",
                },
            )
        )
        profile.prepare()
        output = profile.manage("ensure_admin")
        self.token = output.split("API token:")[1].split()[0]
        self.server = SupervisedProfile(profile)
        self.server.start()
        self.api_base = f"http://127.0.0.1:{profile.ports[0]}/api/v1/"
        setup_django(profile.env)

    def api(self, method: str, path: str, payload: Any = None) -> Any:
        response = httpx.request(
            method, self.api_base + path, json=payload, headers={"Authorization": f"Token {self.token}"}, timeout=60
        )
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path} -> {response.status_code}: {response.text[:500]}")
        return response.json() if response.content else None

    async def api_async(self, method: str, path: str, payload: Any = None) -> Any:
        return await asyncio.to_thread(self.api, method, path, payload)

    # -- faults ------------------------------------------------------------------------

    async def inject(self, kind: str) -> None:
        assert self.server is not None
        mark = self.timeline.mark
        if kind == "redis":
            mark("fault: redis-server stopped")
            await asyncio.to_thread(self.redis.stop)
            await asyncio.sleep(self.options.outage)
            await asyncio.to_thread(self.redis.start)
            mark("fault cleared: redis-server listening again (empty)")
        elif kind == "postgres":
            mark("fault: PostgreSQL stopping (fast)")
            await asyncio.to_thread(self.postgres.stop, "fast")
            mark("PostgreSQL stopped")
            await asyncio.sleep(self.options.postgres_down)
            await asyncio.to_thread(self.postgres.start)
            mark("fault cleared: PostgreSQL accepting connections")
        elif kind == "celery":
            killed = await asyncio.to_thread(self.server.kill, {"celery-worker"})
            mark(f"fault: SIGKILL {'; '.join(killed)}")
            await wait_until(self.server.all_running, 120)
            mark("fault cleared: a new worker started")
        elif kind == "server":
            killed = await asyncio.to_thread(self.server.kill, {"server", "celery-worker", "celery-beat"})
            mark(f"fault: SIGKILL {'; '.join(killed)}")
            # Read before the restarted processes write anything (they take seconds to
            # start): what the killed ones had stored, so the acknowledged reports the kill
            # took with it are counted, not guessed.
            self.right_after_fault = await asyncio.to_thread(database_view, self.uids, self.rollout_id)
            # And what the agents had had acknowledged by then (replies the killed process
            # sent before it died have arrived by now).
            assert self.stats is not None
            self.acked_at_fault = {agent: ledger.last_acked for agent, ledger in self.stats.ledgers.items()}
            await wait_until(self.server.all_running, 300)
            mark("fault cleared: every server process running again")
        else:
            raise ValueError(kind)

    # -- the run -----------------------------------------------------------------------

    async def run(self, kind: str) -> dict[str, Any]:
        options = self.options
        raise_open_file_limit(options.agents * 2)
        assert self.server is not None
        profile = self.server.profile

        def settings_for(index: int) -> AgentSettings:
            return AgentSettings(
                identifying_attributes={"service.name": self.service},
                heartbeat_interval=options.heartbeat,
                fail_if_contains=MARKER if index in self.failing else None,
                backoff_initial=options.backoff,
                backoff_max=30.0,
                shutdown_timeout=2.0,
            )

        fleet = Fleet(
            server=profile.agent_urls,
            count=options.agents,
            settings_for=settings_for,
            connect_rate=options.connect_rate,
        )
        stats = self.stats = DrillStats(options.agents)
        for agent in fleet.agents:
            agent._observer = stats
            stats.watch(agent)
        fleet.stats = stats
        gc.collect()
        gc.freeze()
        probe = OperatorProbe(self.api_base, self.token)
        writes: OperatorPublishes | None = None
        result: dict[str, Any] = {
            "drill": kind,
            "agents": options.agents,
            "failing_agents": len(self.failing),
            "server_processes": options.processes,
            "asgi_server": options.server,
            "hold_seconds": options.hold,
            "heartbeat_seconds": options.heartbeat,
            "uptime_before": uptime(),
        }
        mark = self.timeline.mark
        progress = asyncio.create_task(report_progress(fleet))
        try:
            mark("agents starting")
            await fleet.start()
            if not await fleet.wait_connected(options.agents / max(options.connect_rate, 1) + 300):
                raise RuntimeError(f"only {len(stats.first_reply_at)} of {options.agents} agents connected")
            mark("every agent connected")
            name = f"drill-{self.service}"
            await self.api_async("POST", "configurations/", {"name": name, "selector": f"service.name={self.service}"})
            stable = await self.api_async("POST", f"configurations/{name}/versions/", {"files": STABLE})
            candidate_version = await self.api_async(
                "POST", f"configurations/{name}/versions/", {"files": CANDIDATE, "activate": False}
            )
            stable_hash, candidate_hash = stable["config_hash"], candidate_version["config_hash"]
            probe_configuration = f"probe-{self.service}"
            await self.api_async(
                "POST",
                "configurations/",
                {"name": probe_configuration, "selector": f"service.name=none-{self.service}"},
            )
            writes = OperatorPublishes(self.api_base, self.token, probe_configuration)
            if not await wait_until(lambda: applied(fleet, stable_hash) == options.agents, 600):
                raise RuntimeError(f"only {applied(fleet, stable_hash)} agents applied the stable version")
            mark("every agent applied the stable version")
            stages = [
                {"percent": 1, "hold_seconds": options.hold},
                {"percent": 10, "hold_seconds": options.hold},
                {"percent": 100},
            ]
            rollout = await self.api_async(
                "POST",
                "rollouts/",
                {
                    "configuration": name,
                    "candidate_version": candidate_version["number"],
                    "stages": stages,
                    "max_failure_rate": options.budget,
                    "apply_timeout_seconds": 600,
                },
            )
            rollout_id = rollout["id"]
            probe.path = f"rollouts/{rollout_id}/"
            probe.start()
            writes.start()
            await self.api_async("POST", f"rollouts/{rollout_id}/start/", {})
            mark("rollout started")
            self.rollout_id = rollout_id
            if not await self._wait_stage(1, 600):
                raise RuntimeError("the rollout never reached its 10% stage")
            mark("rollout's 10% stage started")
            await asyncio.sleep(options.fault_delay)
            uids = self.uids = [str(_uuid(agent)) for agent in fleet.agents]
            before = await asyncio.to_thread(database_view, uids, rollout_id)
            result["at_fault"] = counts(fleet, stats, before, candidate_hash)
            fault_at = time.time()
            await self.inject(kind)
            cleared_at = time.time()
            # Recovered: the API answers again and every agent had an answer after the fault.
            await wait_until(lambda: any(p.at > cleared_at and p.status == 200 for p in probe.probes), 300)
            mark("operator API answering again")
            if await wait_until(lambda: answered_since(fleet, stats, cleared_at), 300):
                mark("every agent answered since")
            recovered_at = time.time()
            finished = await wait_until(lambda: self._rollout_state() in TERMINAL, options.settle_timeout, 1.0)
            mark(f"rollout {self._rollout_state()}" if finished else "rollout still not finished")
            expected_state = "rolled_back" if options.failing > options.budget else "succeeded"

            def settled() -> bool:
                if expected_state == "rolled_back":
                    return applied(fleet, stable_hash) == options.agents
                return applied(fleet, candidate_hash) == options.agents - len(self.failing)

            if await wait_until(settled, options.settle_timeout):
                mark("every agent runs its expected version")
            # The server writes status reports in batches (OPAMP_STATUS_FLUSH_SECONDS): give
            # the last flush its time before reading what it stored.
            view = await self._settled_view(fleet, stats, uids)
            mark("invariants read")
            probe.stop()
            writes.stop()
            stored = await asyncio.to_thread(stored_markers, probe_configuration)
            result["at_end"] = counts(fleet, stats, view, candidate_hash)
            if self.right_after_fault is not None:
                after_kill = counts(fleet, stats, self.right_after_fault, candidate_hash, acked=self.acked_at_fault)
                # The agent-side totals of counts() are of now, not of the kill.
                for key in ("status_reports_sent", "status_reports_acknowledged", "agents_applied_candidate"):
                    after_kill.pop(key)
                matched = after_kill["agents_whose_stored_status_is_their_last_acknowledged"]
                after_kill["agents_with_an_acknowledged_status_not_stored"] = options.agents - matched
                result["right_after_the_kill"] = after_kill
            result["final_state"] = view["rollout"]["state"]
            result["invariants"] = check(fleet, stats, view, self.failing, expected_state, candidate_hash, cleared_at)
            result["invariants"]["operator_writes_kept"] = check_writes(writes.probes, stored)
            result["operator"] = {
                "before_fault": probe.summary(self.timeline.origin, fault_at),
                "during_fault_and_recovery": probe.summary(fault_at, recovered_at),
                "after_recovery": probe.summary(recovered_at, time.time()),
            }
            result["operator_publishes"] = {
                "before_fault": writes.summary(self.timeline.origin, fault_at),
                "during_fault_and_recovery": writes.summary(fault_at, recovered_at),
                "after_recovery": writes.summary(recovered_at, time.time()),
            }
            result["agent_session_errors"] = dict(stats.session_errors.most_common(5))
            result["agent_disconnects"] = stats.disconnects
            result["server_restarts"] = [
                {"at": round(t - self.timeline.origin, 1), "what": what} for t, what in self.server.restarts
            ]
            for kind_, stage, at in view["events"]:
                self.timeline.marks.append((f"rollout event {kind_} (stage {stage})", at.timestamp()))
            self.timeline.marks.sort(key=lambda mark_: mark_[1])
            result["timeline"] = self.timeline.as_list()
            result["server_log_errors"] = log_errors(profile.log_dir)
            result["uptime_after"] = uptime()
            result["ok"] = all(item["ok"] for item in result["invariants"].values())
            return result
        finally:
            probe.stop()
            if writes is not None:
                writes.stop()
            progress.cancel()
            await fleet.stop(timeout=15)
            gc.unfreeze()

    async def _settled_view(self, fleet: Fleet, stats: DrillStats, uids: list[str]) -> dict[str, Any]:
        deadline = time.monotonic() + 60
        while True:
            view = await asyncio.to_thread(database_view, uids, self.rollout_id)
            if not status_mismatches(fleet, stats, view) or time.monotonic() > deadline:
                return view
            await asyncio.sleep(2)

    async def _wait_stage(self, stage: int, timeout: float) -> bool:
        return await wait_until(lambda: self._rollout_stage() >= stage, timeout, 0.5)

    def _rollout_row(self) -> dict[str, Any] | None:
        try:
            return dict(self.api("GET", f"rollouts/{self.rollout_id}/"))
        except (httpx.HTTPError, RuntimeError):
            return None

    def _rollout_stage(self) -> int:
        row = self._rollout_row()
        return int(row["stage_index"]) if row else -1

    def _rollout_state(self) -> str:
        row = self._rollout_row()
        return str(row["state"]) if row else "unknown"

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.redis.stop()
        self.postgres.destroy()


def _uuid(agent: Agent) -> Any:
    import uuid

    return uuid.UUID(bytes=agent.instance_uid)


LEVELS = re.compile(r"(?: |: |/)(WARNING|ERROR|CRITICAL)[ /:]")


def log_errors(log_dir: Path) -> dict[str, Any]:
    """Per server log: lines at WARNING or above (the profile logs nothing below), tracebacks,
    and the commonest messages with their numbers (ports, times, ids) blanked out."""
    found: dict[str, Any] = {}
    for path in sorted(log_dir.glob("*.log")):
        lines = path.read_text(errors="replace").splitlines()
        flagged = [(match.group(1), line[match.end() :]) for line in lines if (match := LEVELS.search(line))]
        tracebacks = sum(line.startswith("Traceback") for line in lines)
        if flagged or tracebacks:
            common = Counter(f"{level} {re.sub(r'[0-9]+', 'N', text)[:150]}" for level, text in flagged)
            found[path.stem] = {
                "lines": dict(Counter(level for level, _ in flagged)),
                "tracebacks": tracebacks,
                "common": dict(common.most_common(4)),
            }
    return found


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def applied(fleet: Fleet, config_hash: str) -> int:
    return sum(agent.remote_config.applied_hash.hex() == config_hash for agent in fleet.agents)


def answered_since(fleet: Fleet, stats: DrillStats, since: float) -> bool:
    return all(agent in stats.online and stats.ledgers[agent].last_reply_at > since for agent in fleet.agents)


def status_mismatches(
    fleet: Fleet, stats: DrillStats, view: dict[str, Any], acked: dict[Agent, tuple[str, int] | None] | None = None
) -> list[str]:
    """Agents whose stored remote config status is not their last acknowledged one (now,
    or as `acked` gives it for an earlier moment)."""
    wrong = []
    for agent in fleet.agents:
        uid = str(_uuid(agent))
        row = view["agents"].get(uid)
        last = acked[agent] if acked is not None else stats.ledgers[agent].last_acked
        if row is None or last is None or tuple(row["reported"]) != last:
            wrong.append(uid)
    return wrong


def counts(
    fleet: Fleet,
    stats: DrillStats,
    view: dict[str, Any],
    candidate_hash: str,
    acked: dict[Agent, tuple[str, int] | None] | None = None,
) -> dict[str, Any]:
    ledgers = stats.ledgers.values()
    targets = Counter(answer or "none" for answer, _ in view.get("targets", {}).values())
    return {
        "status_reports_sent": sum(ledger.sent for ledger in ledgers),
        "status_reports_acknowledged": sum(ledger.acked for ledger in ledgers),
        "agents_whose_stored_status_is_their_last_acknowledged": len(fleet.agents)
        - len(status_mismatches(fleet, stats, view, acked)),
        "agents_applied_candidate": applied(fleet, candidate_hash),
        "server_rows_applied_candidate": sum(
            1 for row in view["agents"].values() if tuple(row["reported"]) == (candidate_hash, 1)
        ),
        "rollout_targets_by_answer": dict(targets),
        "rollout": view.get("rollout"),
    }


def check(
    fleet: Fleet,
    stats: DrillStats,
    view: dict[str, Any],
    failing: set[int],
    expected_state: str,
    candidate_hash: str,
    cleared_at: float,
) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}

    def verdict(name: str, bad: list[Any], detail: str) -> None:
        results[name] = {"ok": not bad, "detail": detail, "failures": len(bad), "examples": [str(b) for b in bad[:5]]}

    agents = list(enumerate(fleet.agents))
    uid = {agent: str(_uuid(agent)) for _, agent in agents}
    rows = view["agents"]
    verdict(
        "every_agent_reconnected",
        [uid[a] for _, a in agents if a not in stats.online or stats.ledgers[a].last_reply_at <= cleared_at],
        "every agent is on a live session that had an answer after the fault cleared",
    )
    verdict(
        "desired_is_the_resolvers_answer",
        [uid[a] for _, a in agents if uid[a] not in rows or not rows[uid[a]]["stored_matches_resolver"]],
        "each agent's stored assignment equals computed_assignments() now",
    )
    wrong_agent_side = []
    for index, agent in agents:
        row = rows.get(uid[agent])
        record = agent.remote_config
        want = row["desired_hash"] if row else None
        if index in failing and want == candidate_hash:
            ok = record.last_hash.hex() == want and record.status == pb.RemoteConfigStatuses_FAILED
        else:
            ok = record.applied_hash.hex() == want and record.status == pb.RemoteConfigStatuses_APPLIED
        if not ok:
            wrong_agent_side.append(f"{uid[agent]}: runs {record.applied_hash.hex()[:12]}, desired {str(want)[:12]}")
    verdict(
        "agents_report_their_desired_hash",
        wrong_agent_side,
        "each agent reports its desired hash APPLIED (a failing agent: FAILED when the candidate is desired)",
    )
    server_wrong = []
    for index, agent in agents:
        row = rows.get(uid[agent])
        if row is None:
            server_wrong.append(f"{uid[agent]}: no row")
            continue
        want_state = 3 if index in failing and row["desired_hash"] == candidate_hash else 1
        if tuple(row["reported"]) != (row["desired_hash"], want_state):
            server_wrong.append(f"{uid[agent]}: stored {row['reported'][0][:12]}/{row['reported'][1]}")
    verdict(
        "server_stores_the_desired_hash_reported",
        server_wrong,
        "the server's stored remote config status of each agent is its desired hash, APPLIED (FAILED)",
    )
    state = view["rollout"]["state"]
    verdict("rollout_ended_as_expected", [] if state == expected_state else [state], f"expected {expected_state}")
    events = [(kind, stage) for kind, stage, _ in view["events"]]
    repeated = [
        f"{kind} stage {stage} x{n}" for (kind, stage), n in Counter(events).items() if kind in TRANSITIONS and n > 1
    ]
    started = [stage for kind, stage in events if kind == "stage_started"]
    if started != sorted(started) or (started and started != list(range(started[0], started[0] + len(started)))):
        repeated.append(f"stages started in the order {started}")
    verdict("no_transition_twice", repeated, f"events: {', '.join(f'{k}:{s}' for k, s in events)}")
    lost = []
    for agent in fleet.agents:
        ledger = stats.ledgers[agent]
        row = rows.get(uid[agent])
        if row is None or ledger.last_acked is None or tuple(row["reported"]) != ledger.last_acked:
            lost.append(f"{uid[agent]}: last acknowledged {ledger.last_acked}, stored {row and row['reported']}")
    id_to_index = {rows[uid[a]]["id"]: i for i, a in agents if uid[a] in rows}
    for agent_id, (answer, reverted) in view["targets"].items():
        target_index = id_to_index.get(agent_id)
        if target_index is None:
            continue
        expected_answer = "failed" if target_index in failing else "applied"
        if answer != expected_answer and not (reverted and state == "rolled_back"):
            lost.append(f"target of agent {agent_id}: answer {answer or 'none'}, the agent answered {expected_answer}")
    verdict(
        "no_status_report_lost",
        lost,
        "each agent's stored status is its last acknowledged one; each rollout target holds the agent's answer",
    )
    return results


async def report_progress(fleet: Fleet, every: float = 15.0) -> None:
    stats = fleet.stats
    while True:
        await asyncio.sleep(every)
        log(f"{len(stats.online)}/{len(fleet.agents)} online, {stats.replies} replies, {stats.disconnects} disconnects")


def run_one(kind: str, options: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"opamp-fault-{kind}-"))
    workdir.chmod(0o711)  # the cluster's owner (postgres) passes through to its directory
    drill = Drill(options, workdir)
    try:
        drill.start_services()
        return asyncio.run(drill.run(kind))
    finally:
        drill.close()
        if not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"kept {workdir}")


def print_summary(result: dict[str, Any]) -> None:
    print(f"\n== drill: {result['drill']} ({result['agents']} agents) -> {'OK' if result.get('ok') else 'FAILED'}")
    for item in result.get("timeline", []):
        print(f"  {item['at']}  +{item['seconds']:7.1f} s  {item['what']}")
    for name, verdict in result.get("invariants", {}).items():
        print(f"  [{'ok' if verdict['ok'] else 'FAIL'}] {name}: {verdict['detail'][:200]}")
        for example in verdict["examples"]:
            print(f"         e.g. {example}")
    for phase, summary in result.get("operator", {}).items():
        print(f"  operator {phase}: {json.dumps(summary)}")
    for phase, summary in result.get("operator_publishes", {}).items():
        print(f"  operator publishes {phase}: {json.dumps(summary)}")
    for name, errors in result.get("server_log_errors", {}).items():
        print(f"  log {name}: {json.dumps(errors)}")
    if "at_fault" in result:
        print(f"  counts at the fault: {json.dumps(result['at_fault'])}")
        if "right_after_the_kill" in result:
            print(f"  counts right after the kill: {json.dumps(result['right_after_the_kill'])}")
        print(f"  counts at the end:   {json.dumps(result['at_end'])}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drill", choices=(*DRILLS, "all"), required=True)
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=1, help="server processes (agents spread round robin)")
    parser.add_argument(
        "--server",
        choices=("uvicorn", "daphne"),
        default=os.environ.get("OPAMP_ASGI_SERVER") or DEFAULT_SERVER,
        help="the ASGI server of the profile (default: OPAMP_ASGI_SERVER, else uvicorn)",
    )
    parser.add_argument("--connect-rate", type=float, default=60.0, help="agents started per second")
    parser.add_argument("--heartbeat", type=float, default=30.0, help="agents' heartbeat interval, seconds")
    parser.add_argument("--hold", type=float, default=20.0, help="seconds the 1%% and 10%% stages hold")
    parser.add_argument("--failing", type=float, default=0.0, help="share of agents that reject the candidate")
    parser.add_argument("--budget", type=float, default=0.01, help="the rollout's max_failure_rate")
    parser.add_argument("--outage", type=float, default=60.0, help="seconds Redis stays stopped")
    parser.add_argument("--postgres-down", type=float, default=5.0, help="seconds between PostgreSQL's stop and start")
    parser.add_argument("--fault-delay", type=float, default=0.0, help="seconds into the 10%% stage the fault comes")
    parser.add_argument("--backoff", type=float, default=1.0, help="agents' first reconnect delay, seconds")
    parser.add_argument("--settle-timeout", type=float, default=300.0, help="seconds to wait for the rollout to end")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, database)")
    parser.add_argument(
        "--server-root", type=Path, help="run the server from this source tree (e.g. `git archive` of a baseline)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    if options.drill == "all":
        # One process per drill: each sets Django up on its own cluster.
        results, status = [], 0
        for kind in DRILLS:
            output = Path(tempfile.mkstemp(prefix=f"fault-{kind}-", suffix=".json")[1])
            args = [arg for arg in (argv if argv is not None else sys.argv[1:])]
            args = _replace_option(_replace_option(args, "--drill", kind), "--output", str(output))
            status |= subprocess.run([sys.executable, __file__, *args]).returncode
            with contextlib.suppress(ValueError):
                results.extend(json.loads(output.read_text() or "[]"))
            output.unlink(missing_ok=True)
        if options.output:
            options.output.write_text(json.dumps(results, indent=2))
        return 1 if status else 0
    try:
        result = run_one(options.drill, options)
    except Exception as error:
        result = {
            "drill": options.drill,
            "agents": options.agents,
            "ok": False,
            "error": f"{type(error).__name__}: {error}",
        }
        log(result["error"])
    print_summary(result)
    if options.output:
        options.output.write_text(json.dumps([result], indent=2, default=str))
    return 0 if result.get("ok") else 1


def _replace_option(args: list[str], name: str, value: str) -> list[str]:
    out, skip = [], False
    for index, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg == name:
            skip = index + 1 < len(args)
            continue
        if arg.startswith(name + "="):
            continue
        out.append(arg)
    return [*out, name, value]


if __name__ == "__main__":
    sys.exit(main())
