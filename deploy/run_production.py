"""Start the whole production profile on this machine, as processes: one command.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/opamp REDIS_URL=redis://127.0.0.1:6379/0 \\
        .venv/bin/python deploy/run_production.py --listen 127.0.0.1:8443

N server processes (one per core by default, each started as deploy/systemd/opamp-server.service
starts it: `python -m opamp_site.server --server uvicorn`, or daphne with `--server daphne`, on
127.0.0.1 ports from `--first-port`), nginx in front of them (TLS with optional
agent client certificates, rendered by `manage.py render_nginx_config --standalone`), a Celery
worker and Celery beat, against the PostgreSQL and Redis named in the environment. Everything
it writes (TLS files, the agents' CA unless OPAMP_CA_CERT_FILE names one, the CRL, logs, nginx's
run directory) goes to `--workdir`. It migrates first. A server, worker or beat process that
exits is started again after a second, as systemd's Restart= would; Ctrl-C stops everything.

Agents connect to wss://LISTEN/v1/opamp and trust `WORKDIR/tls/server-ca.pem` (a CA made for
this machine, unless `--tls-cert`/`--tls-key` are given). The API and admin are at
https://LISTEN/ (`manage.py ensure_admin` with the same environment gives a login). Package
files are sent by nginx once a server has checked the download URL's token
(OPAMP_PACKAGE_DOWNLOAD_ACCEL_PREFIX, set here; deploy/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# The server command line of deploy/systemd/opamp-server.service (see the comments there);
# opamp_site/server.py takes the same options for daphne and uvicorn.
SERVER_OPTIONS = ("--ping-interval", "60", "--ping-timeout", "60", "--websocket_connect_timeout", "30")
# uvicorn: the production profile's server (BENCHMARKS.md, "The ASGI server, by measurement").
DEFAULT_SERVER = "uvicorn"
NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
RESTART_DELAY_SECONDS = 1.0
# Where nginx serves package files the servers authorised (X-Accel-Redirect; the same value
# renders nginx's internal location). Without nginx the servers stream them themselves.
PACKAGE_ACCEL_PREFIX = "/_internal/package-files/"
LISTEN_TIMEOUT_SECONDS = 60.0


def find_nginx() -> str | None:
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory) / "nginx"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return next((path for path in NGINX_CANDIDATES if os.access(path, os.X_OK)), None)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def wait_listening(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + LISTEN_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}; see {log}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listened on {port} within {LISTEN_TIMEOUT_SECONDS:.0f} s; see {log}")


@dataclass
class ProfileOptions:
    database_url: str
    redis_url: str
    workdir: Path
    processes: int = field(default_factory=lambda: os.cpu_count() or 1)
    first_port: int = 8001
    listen: str = "127.0.0.1:8443"
    nginx: bool = True
    celery: bool = True
    tls_cert: Path | None = None
    tls_key: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    # The source tree the server processes run from (benchmarks compare a baseline's).
    server_root: Path | None = None
    # The ASGI server (opamp_site/server.py `--server`): uvicorn or daphne.
    server: str = DEFAULT_SERVER


class ProductionProfile:
    """The processes of the production profile; `prepare()` once, then `start()` / `stop()`."""

    def __init__(self, options: ProfileOptions) -> None:
        if options.processes < 1:
            raise ValueError("at least one server process")
        self.options = options
        self.workdir = options.workdir.absolute()
        self.root = (options.server_root or REPO_ROOT).absolute()
        self.ports = [options.first_port + index for index in range(options.processes)]
        self.servers: list[subprocess.Popen[bytes] | None] = [None] * options.processes
        self.others: dict[str, subprocess.Popen[bytes]] = {}
        self.tls_dir = self.workdir / "tls"
        self.log_dir = self.workdir / "log"
        self.nginx_dir = self.workdir / "nginx"
        self.nginx_binary = find_nginx() if options.nginx else None
        if options.nginx and self.nginx_binary is None:
            raise RuntimeError("nginx is not installed (apt-get install -y nginx)")
        env = {key: value for key, value in os.environ.items() if not key.startswith("DJANGO_SETTINGS")}
        ca_cert = env.get("OPAMP_CA_CERT_FILE") or str(self.tls_dir / "agents-ca.pem")
        ca_key = env.get("OPAMP_CA_KEY_FILE") or str(self.tls_dir / "agents-ca.key")
        var_dir = env.get("OPAMP_VAR_DIR") or str(self.workdir / "var")
        self.env = {
            **env,
            "DJANGO_SETTINGS_MODULE": "opamp_site.settings.production",
            "DATABASE_URL": options.database_url,
            "REDIS_URL": options.redis_url,
            "DJANGO_SECRET_KEY": env.get("DJANGO_SECRET_KEY") or secrets.token_urlsafe(48),
            "DJANGO_ALLOWED_HOSTS": env.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost"),
            # nginx reaches the servers from loopback: the only peer allowed to forward certificates.
            "OPAMP_TRUSTED_PROXIES": env.get("OPAMP_TRUSTED_PROXIES", "127.0.0.1"),
            "OPAMP_CA_CERT_FILE": ca_cert,
            "OPAMP_CA_KEY_FILE": ca_key,
            "OPAMP_CRL_FILE": env.get("OPAMP_CRL_FILE") or str(self.tls_dir / "agents-ca.crl"),
            "OPAMP_VAR_DIR": var_dir,
            "OPAMP_PACKAGE_DIR": env.get("OPAMP_PACKAGE_DIR") or str(Path(var_dir) / "packages"),
            "OPAMP_PACKAGE_DOWNLOAD_ACCEL_PREFIX": (
                env.get("OPAMP_PACKAGE_DOWNLOAD_ACCEL_PREFIX", PACKAGE_ACCEL_PREFIX) if options.nginx else ""
            ),
            "PYTHONUNBUFFERED": "1",
            **options.extra_env,
        }

    # -- addresses -------------------------------------------------------------------------

    @property
    def uses_nginx(self) -> bool:
        return self.options.nginx

    @property
    def agent_urls(self) -> list[str]:
        """Where agents connect: nginx, or each server process directly."""
        if self.uses_nginx:
            return [f"wss://{self.options.listen}/v1/opamp"]
        return [f"ws://127.0.0.1:{port}/v1/opamp" for port in self.ports]

    @property
    def agent_ca_file(self) -> Path | None:
        """The CA agents verify nginx's certificate with (None without nginx)."""
        return self.tls_dir / "server-ca.pem" if self.uses_nginx and self.options.tls_cert is None else None

    # -- preparation -----------------------------------------------------------------------

    def manage(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def prepare(self) -> None:
        directories = (self.workdir, self.tls_dir, self.log_dir, Path(self.env["OPAMP_VAR_DIR"]))
        # The packages directory exists before nginx's configuration aliases it.
        for directory in (*directories, Path(self.env["OPAMP_PACKAGE_DIR"])):
            directory.mkdir(parents=True, exist_ok=True)
        self.manage("migrate", "--noinput", "-v0")
        if self.options.celery:
            self.manage("register_periodic_tasks")
        if self.uses_nginx:
            self._prepare_tls()
            self._render_nginx()

    def _prepare_tls(self) -> None:
        if not Path(self.env["OPAMP_CA_CERT_FILE"]).exists():
            self.manage(
                "create_ca", "--key-file", self.env["OPAMP_CA_KEY_FILE"], "--cert-file", self.env["OPAMP_CA_CERT_FILE"]
            )
        self.manage("write_crl", "--output", self.env["OPAMP_CRL_FILE"])
        if self.options.tls_cert is None and not (self.tls_dir / "server.pem").exists():
            self._make_server_certificate()

    def _make_server_certificate(self) -> None:
        """A CA of this machine's own and a certificate for the listen address, signed by it."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        from signing.ca import create_ca

        ca = create_ca(common_name="OpAMP local server CA", days=365)
        (self.tls_dir / "server-ca.pem").write_text(ca.cert_pem, encoding="ascii")
        host = self.options.listen.rpartition(":")[0].strip("[]") or "127.0.0.1"
        try:
            alt_name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            alt_name = x509.DNSName(host)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName([alt_name]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca.key, hashes.SHA256())
        )
        key_file = self.tls_dir / "server.key"
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        key_file.chmod(0o600)
        (self.tls_dir / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def _render_nginx(self) -> None:
        tls_cert = self.options.tls_cert or self.tls_dir / "server.pem"
        tls_key = self.options.tls_key or self.tls_dir / "server.key"
        args = [
            "render_nginx_config", "--standalone", str(self.nginx_dir), "--listen", self.options.listen,
            "--tls-cert", str(tls_cert), "--tls-key", str(tls_key), "--crl", self.env["OPAMP_CRL_FILE"],
            "--output", str(self.workdir / "nginx.conf"),
        ]  # fmt: skip
        for port in self.ports:
            args += ["--upstream", f"127.0.0.1:{port}"]
        if os.geteuid() == 0:
            # Started by root, nginx's workers would become `nobody`, who cannot write the run directory.
            import grp
            import pwd

            args += ["--user", f"{pwd.getpwuid(os.getuid()).pw_name}:{grp.getgrgid(os.getgid()).gr_name}"]
        self.manage(*args)

    # -- processes -------------------------------------------------------------------------

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("ab")
        try:
            return subprocess.Popen(command, cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()

    def start_server(self, index: int) -> None:
        port = self.ports[index]
        server = ("--server", self.options.server)
        command = [sys.executable, "-m", "opamp_site.server", *server, "-b", "127.0.0.1", "-p", str(port)]
        process = self._spawn(f"server-{index}", [*command, *SERVER_OPTIONS, "opamp_site.asgi:application"])
        self.servers[index] = process
        wait_listening(port, process, self.log_dir / f"server-{index}.log")

    def start_servers(self) -> None:
        for index in range(len(self.ports)):
            self.start_server(index)

    def kill_server(self, index: int) -> None:
        process = self.servers[index]
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
        self.servers[index] = None

    def kill_servers(self) -> None:
        for index in range(len(self.ports)):
            self.kill_server(index)

    def server_pids(self) -> list[int]:
        return [process.pid for process in self.servers if process is not None and process.poll() is None]

    def _start_celery(self) -> None:
        celery = [sys.executable, "-m", "celery", "-A", "opamp_site"]
        self.others["celery-worker"] = self._spawn("celery-worker", [*celery, "worker", "--loglevel=INFO"])
        self.others["celery-beat"] = self._spawn("celery-beat", [*celery, "beat", "--loglevel=INFO"])

    def _start_nginx(self) -> None:
        assert self.nginx_binary is not None
        process = self._spawn("nginx", [self.nginx_binary, "-c", str(self.workdir / "nginx.conf"), "-g", "daemon off;"])
        self.others["nginx"] = process
        wait_listening(int(self.options.listen.rpartition(":")[2]), process, self.nginx_dir / "error.log")

    def start(self) -> None:
        self.start_servers()
        if self.uses_nginx:
            self._start_nginx()
        if self.options.celery:
            self._start_celery()

    def supervise_once(self) -> list[str]:
        """Start again whatever exited (as systemd's Restart= would); the names restarted."""
        restarted = []
        for index, process in enumerate(self.servers):
            if process is None or process.poll() is not None:
                self.start_server(index)
                restarted.append(f"server-{index}")
        for name in ("celery-worker", "celery-beat"):
            process = self.others.get(name)
            if process is not None and process.poll() is not None:
                self.others[name] = self._spawn(name, list(map(str, process.args)))  # type: ignore[arg-type]
                restarted.append(name)
        nginx = self.others.get("nginx")
        if nginx is not None and nginx.poll() is not None:
            raise RuntimeError(f"nginx exited with {nginx.returncode}; see {self.nginx_dir / 'error.log'}")
        return restarted

    def stop(self) -> None:
        running = [process for process in [*self.others.values(), *self.servers] if process is not None]
        for process in running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in running:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.others.clear()
        self.servers = [None] * len(self.ports)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="server processes (default: cores)")
    parser.add_argument("--first-port", type=int, default=8001, help="the first server process's port")
    parser.add_argument(
        "--server",
        choices=("uvicorn", "daphne"),
        default=os.environ.get("OPAMP_ASGI_SERVER") or DEFAULT_SERVER,
        help="the ASGI server (default: OPAMP_ASGI_SERVER, else uvicorn)",
    )
    parser.add_argument("--listen", default="127.0.0.1:8443", help="nginx's TLS address (default 127.0.0.1:8443)")
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "var" / "production")
    parser.add_argument("--tls-cert", type=Path, help="nginx's certificate (default: one made for this machine)")
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument("--no-celery", action="store_true", help="leave out the Celery worker and beat")
    return parser


def main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    database_url, redis_url = os.environ.get("DATABASE_URL", ""), os.environ.get("REDIS_URL", "")
    if not database_url.startswith("postgres") or not redis_url.startswith("redis"):
        build_parser().error("set DATABASE_URL (postgres://...) and REDIS_URL (redis://...)")
    if (options.tls_cert is None) != (options.tls_key is None):
        build_parser().error("--tls-cert and --tls-key go together")
    profile = ProductionProfile(
        ProfileOptions(
            database_url=database_url,
            redis_url=redis_url,
            workdir=options.workdir,
            processes=options.processes,
            first_port=options.first_port,
            listen=options.listen,
            celery=not options.no_celery,
            tls_cert=options.tls_cert,
            tls_key=options.tls_key,
            server=options.server,
        )
    )
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    profile.prepare()
    profile.start()
    print(f"agents: {', '.join(profile.agent_urls)} (CA: {profile.agent_ca_file or 'your --tls-cert issuer'})")
    print(f"{options.server} on ports {', '.join(map(str, profile.ports))}; logs in {profile.log_dir}; Ctrl-C stops")
    try:
        while True:
            time.sleep(RESTART_DELAY_SECONDS)
            # Ctrl-C in a terminal (or a SIGTERM to the process group) reaches the children
            # too: once it arrived, a child that exited is stopping, not crashed. The sleep
            # goes on after the handler ran, so the flag is read after it, not only before.
            if stopping:
                break
            try:
                restarted = profile.supervise_once()
            except RuntimeError:
                if stopping:
                    break  # nginx took the same signal while the children were checked
                raise
            for name in restarted:
                print(f"{name} exited; started it again", flush=True)
    finally:
        profile.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
