"""The nginx configuration of the mTLS profile: values, their validation, and rendering.

Pure (standard library and `cryptography`); `manage.py render_nginx_config` feeds it. The
templates live in deploy/nginx/. nginx terminates TLS, verifies the client certificates
agents present against the agents' CA and its CRL, and passes the result to daphne in
headers it always overwrites (the header contract is in the site template).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from opamp.certificates import is_ca_certificate

PLACEHOLDER = re.compile(r"\{\{ (\w+) \}\}")
# Characters nginx would read as syntax (or as a variable, `$`) inside an unquoted value.
UNSAFE_IN_VALUE = re.compile(r"[\s;{}'\"\\$#]")
SERVER_NAME = re.compile(r"^[A-Za-z0-9*._~^-]+$")
HOST_NAME = re.compile(r"^[A-Za-z0-9.-]+$")
ERROR_LOG_LEVELS = ("debug", "info", "notice", "warn", "error", "crit", "alert", "emerg")
SIGNING_PUBLIC_KEYS = (
    rsa.RSAPublicKey,
    ec.EllipticCurvePublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
    dsa.DSAPublicKey,
)
USER_NAME = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]*$")
# An absolute URI path of plain segments ending in `/`: nginx's location, the application's
# X-Accel-Redirect prefix (OPAMP_PACKAGE_DOWNLOAD_ACCEL_PREFIX).
ACCEL_PREFIX = re.compile(r"^(/[A-Za-z0-9._~-]+)+/$")
# The routes of the application nginx must leave to it; an internal location over one of
# them would answer its requests with 404.
APPLICATION_PREFIXES = ("/v1/", "/api/", "/admin/", "/static/")


@dataclass(frozen=True)
class PackageFiles:
    """Package bytes nginx serves once the application has authorised the download.

    The application answers a valid download URL with `X-Accel-Redirect: PREFIX<stored
    name>`; the `internal` location at `accel_prefix` aliases `directory`, the packages
    storage's, so nginx sends the file (Range, HEAD, sendfile) and no server process holds
    the download. A request from outside to the prefix gets 404.
    """

    accel_prefix: str
    directory: Path


@dataclass(frozen=True)
class Site:
    """What the server block needs. Paths are absolute."""

    listen: tuple[str, ...]
    server_name: str
    # One or more daphne processes (HOST:PORT or unix:PATH); nginx spreads agents over them.
    upstreams: tuple[str, ...]
    tls_cert: Path
    tls_key: Path
    ca_cert: Path
    crl: Path
    max_body_bytes: int
    websocket_timeout_seconds: int
    # OPAMP_PACKAGE_MAX_BYTES: client_max_body_size of the package upload route alone.
    package_max_bytes: int
    static_root: Path | None = None
    package_files: PackageFiles | None = None
    # OPAMP_HTTP_HEADER_TIMEOUT_SECONDS and OPAMP_HTTP_BODY_TIMEOUT_SECONDS by default.
    header_timeout_seconds: int = 15
    body_timeout_seconds: int = 60


@dataclass(frozen=True)
class Standalone:
    """A complete nginx.conf whose pid file, logs and temporary files live in `run_dir`."""

    run_dir: Path
    user: str | None = None
    group: str | None = None
    error_log_level: str = "warn"
    # Each agent holds two sockets in a worker (its own and the one to daphne).
    worker_connections: int = 40000


# --- validation of the values -----------------------------------------------------------


def _port_problem(option: str, value: str, port: str) -> str | None:
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"{option} {value!r}: the port must be a number from 1 to 65535"
    return None


def _host_port_problem(option: str, value: str, *, host_required: bool) -> str | None:
    """None when `value` is PORT (if allowed), HOST:PORT or [IPv6]:PORT."""
    if value.isdigit() and not host_required:
        return _port_problem(option, value, value)
    if value.startswith("["):
        host, separator, port = value[1:].partition("]:")
        if not separator:
            return f"{option} {value!r}: an IPv6 address is written [ADDRESS]:PORT"
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"{option} {value!r}: {host!r} is not an IPv6 address"
        return _port_problem(option, value, port)
    host, separator, port = value.rpartition(":")
    if not separator or not host:
        expected = "HOST:PORT" if host_required else "PORT or HOST:PORT"
        return f"{option} {value!r}: expected {expected}"
    if host != "*" and not HOST_NAME.match(host):
        return f"{option} {value!r}: {host!r} is not a host name or address"
    return _port_problem(option, value, port)


def _path_problem(option: str, path: Path) -> str | None:
    if not path.is_absolute():
        return f"{option} {path}: the path must be absolute"
    if UNSAFE_IN_VALUE.search(str(path)):
        return f"{option} {path}: the path contains whitespace or a character nginx reads as syntax (;{{}}'\"\\$#)"
    return None


def value_problems(site: Site, standalone: Standalone | None = None) -> list[str]:
    """Everything wrong with the values themselves (not with the files they name)."""
    problems: list[str] = []
    if not site.listen:
        problems.append("--listen: at least one address is needed")
    problems += [p for value in site.listen if (p := _host_port_problem("--listen", value, host_required=False))]
    if not site.upstreams:
        problems.append("--upstream: at least one address is needed")
    if len(set(site.upstreams)) != len(site.upstreams):
        problems.append("--upstream: an address is given twice")
    for upstream in site.upstreams:
        if upstream.startswith("unix:"):
            if problem := _path_problem("--upstream", Path(upstream.removeprefix("unix:"))):
                problems.append(problem)
        elif problem := _host_port_problem("--upstream", upstream, host_required=True):
            problems.append(problem)
    names = site.server_name.split()
    if not names or not all(SERVER_NAME.match(name) for name in names):
        problems.append(f"--server-name {site.server_name!r}: expected host names separated by spaces (or _)")
    paths = [
        ("--tls-cert", site.tls_cert),
        ("--tls-key", site.tls_key),
        ("--ca-cert", site.ca_cert),
        ("--crl", site.crl),
    ]
    if site.static_root is not None:
        paths.append(("--static-root", site.static_root))
    if site.package_files is not None:
        paths.append(("--package-dir", site.package_files.directory))
        problems += _accel_prefix_problems(site.package_files.accel_prefix)
    if standalone is not None:
        paths.append(("--standalone", standalone.run_dir))
    problems += [problem for option, path in paths if (problem := _path_problem(option, path))]
    if site.max_body_bytes < 1:
        problems.append(f"--max-body-bytes {site.max_body_bytes}: must be at least 1")
    if site.package_max_bytes < 1:
        problems.append(f"--package-max-bytes {site.package_max_bytes}: must be at least 1")
    if site.websocket_timeout_seconds < 1:
        problems.append(f"--websocket-timeout {site.websocket_timeout_seconds}: must be at least 1 second")
    if standalone is not None:
        for option, name in (("--user", standalone.user), ("--user (group)", standalone.group)):
            if name is not None and not USER_NAME.match(name):
                problems.append(f"{option} {name!r}: not a valid user or group name")
        if standalone.worker_connections < 1024:
            problems.append(f"--worker-connections {standalone.worker_connections}: must be at least 1024")
        if standalone.error_log_level not in ERROR_LOG_LEVELS:
            problems.append(f"--error-log-level {standalone.error_log_level!r}: one of {', '.join(ERROR_LOG_LEVELS)}")
    return problems


def _accel_prefix_problems(prefix: str) -> list[str]:
    option = "--package-accel-prefix"
    if not ACCEL_PREFIX.match(prefix) or any(segment in (".", "..") for segment in prefix.split("/")):
        expected = "a path like /_internal/package-files/ (letters, digits, ._~-; ends in /)"
        return [f"{option} {prefix!r}: expected {expected}"]
    if prefix.startswith(APPLICATION_PREFIXES):
        return [f"{option} {prefix!r}: under one of the application's routes ({', '.join(APPLICATION_PREFIXES)})"]
    return []


# --- validation of the files ------------------------------------------------------------


def _read(option: str, path: Path, problems: list[str]) -> bytes | None:
    if not path.exists():
        problems.append(f"{option} {path}: no such file")
        return None
    if not path.is_file():
        problems.append(f"{option} {path}: not a regular file")
        return None
    try:
        return path.read_bytes()
    except OSError as error:
        problems.append(f"{option} {path}: cannot be read ({error.strerror or type(error).__name__})")
        return None


def _load_certificate(option: str, path: Path, problems: list[str]) -> x509.Certificate | None:
    data = _read(option, path, problems)
    if data is None:
        return None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        problems.append(f"{option} {path}: not a PEM certificate")
        return None


def _crl_signed_by(crl: x509.CertificateRevocationList, ca_cert: x509.Certificate) -> bool:
    key = ca_cert.public_key()
    if crl.issuer != ca_cert.subject or not isinstance(key, SIGNING_PUBLIC_KEYS):
        return False
    try:
        return crl.is_signature_valid(key)
    except (TypeError, ValueError, UnsupportedAlgorithm):
        return False


def file_problems(site: Site, *, now: datetime | None = None) -> list[str]:
    """Everything wrong with the files: missing, unreadable, unparsable, or not fitting together.

    nginx refuses to start without any of them, and starts but refuses every agent
    certificate when the CRL is not the CA's or is past its nextUpdate; both are caught here.
    The TLS key is only required to exist: it is often readable by root (nginx's master
    process) alone, and `nginx -t` checks that it matches the certificate.
    """
    moment = now or datetime.now(UTC)
    problems: list[str] = []
    tls_cert = _load_certificate("--tls-cert", site.tls_cert, problems)
    if tls_cert is not None and tls_cert.not_valid_after_utc < moment:
        problems.append(f"--tls-cert {site.tls_cert}: expired on {tls_cert.not_valid_after_utc.isoformat()}")
    if not site.tls_key.exists():
        problems.append(f"--tls-key {site.tls_key}: no such file")
    elif not site.tls_key.is_file():
        problems.append(f"--tls-key {site.tls_key}: not a regular file")
    ca_cert = _load_certificate("--ca-cert", site.ca_cert, problems)
    if ca_cert is not None and not is_ca_certificate(ca_cert):
        problems.append(f"--ca-cert {site.ca_cert}: not a CA certificate (basicConstraints CA:true is missing)")
    crl_data = _read("--crl", site.crl, problems)
    if crl_data is not None:
        try:
            crl = x509.load_pem_x509_crl(crl_data)
        except ValueError:
            problems.append(f"--crl {site.crl}: not a PEM CRL (write one with manage.py write_crl)")
        else:
            if ca_cert is not None and not _crl_signed_by(crl, ca_cert):
                problems.append(
                    f"--crl {site.crl}: not signed by the CA in {site.ca_cert}; nginx would refuse every agent "
                    "certificate (write a fresh one with manage.py write_crl)"
                )
            next_update = crl.next_update_utc
            if next_update is not None and next_update < moment:
                problems.append(
                    f"--crl {site.crl}: expired at {next_update.isoformat()}; nginx would refuse every agent "
                    "certificate (write a fresh one with manage.py write_crl)"
                )
    if site.static_root is not None and not site.static_root.is_dir():
        problems.append(f"--static-root {site.static_root}: no such directory (run manage.py collectstatic)")
    if site.package_files is not None and not site.package_files.directory.is_dir():
        problems.append(
            f"--package-dir {site.package_files.directory}: no such directory (the packages storage's, "
            "OPAMP_PACKAGE_DIR; create it, owned by the server's user and readable by nginx's workers)"
        )
    return problems


# --- rendering --------------------------------------------------------------------------


def fill(template: str, values: dict[str, str]) -> str:
    """Replace every `{{ name }}`; an unknown or an unused name is an error, not a blank."""
    used: set[str] = set()

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise KeyError(f"the template has a placeholder {{{{ {name} }}}} that nothing fills")
        used.add(name)
        return values[name]

    result = PLACEHOLDER.sub(replace, template)
    if unused := set(values) - used:
        raise KeyError(f"the template lacks the placeholders {', '.join(sorted(unused))}")
    return result


def upstream_servers(upstreams: tuple[str, ...]) -> str:
    """The upstream block's server lines. `max_fails=0`: never mark a process unavailable.

    With nginx's default (max_fails=1 fail_timeout=10s) a restarting process is marked down
    after one refused connection, and with every process restarting at once nginx let about
    one connection per server through every ten seconds (200 agents: 10 back after 60 s).
    A refused connection is retried on the next server anyway (proxy_next_upstream), so the
    mark buys nothing on loopback and costs a whole fleet's reconnect.
    """
    return "\n".join(f"    server {upstream} max_fails=0;" for upstream in upstreams)


def package_files_location(package_files: PackageFiles | None) -> str:
    """The `internal` location X-Accel-Redirect hands authorised downloads to; empty without one."""
    if package_files is None:
        return ""
    return (
        "    # Package file bytes, once the application has checked the download URL's token\n"
        "    # (its X-Accel-Redirect; rollouts/package_downloads.py). `internal`: a request from\n"
        "    # outside gets 404. try_files answers only regular files: no directory, no listing.\n"
        "    # The application's ETag (the SHA-256) replaces nginx's, so an agent's If-Range\n"
        "    # matches; Content-Type and Cache-Control are kept from its answer.\n"
        f"    location ^~ {package_files.accel_prefix} {{\n"
        "        internal;\n"
        f"        alias {package_files.directory}/;\n"
        "        try_files $uri =404;\n"
        "        autoindex off;\n"
        "        sendfile on;\n"
        "        tcp_nopush on;\n"
        "        etag off;\n"
        "        add_header ETag $upstream_http_etag;\n"
        "    }\n"
    )


def render_site(site: Site, template: str) -> str:
    static_location = ""
    if site.static_root is not None:
        static_location = (
            "    # collectstatic's output, served by nginx (the production settings do not serve it).\n"
            "    location /static/ {\n"
            f"        alias {site.static_root}/;\n"
            "        expires 1h;\n"
            "    }\n"
        )
    return fill(
        template,
        {
            # reuseport: each worker gets a listening socket of its own, so the kernel spreads
            # new agents over the workers instead of waking all of them for each one.
            "listen_directives": "\n".join(f"    listen {value} ssl reuseport;" for value in site.listen),
            "server_name": site.server_name,
            "upstream_servers": upstream_servers(site.upstreams),
            "tls_cert": str(site.tls_cert),
            "tls_key": str(site.tls_key),
            "ca_cert": str(site.ca_cert),
            "crl": str(site.crl),
            "max_body_bytes": str(site.max_body_bytes),
            "package_max_bytes": str(site.package_max_bytes),
            "websocket_timeout": str(site.websocket_timeout_seconds),
            "header_timeout": str(site.header_timeout_seconds),
            "body_timeout": str(site.body_timeout_seconds),
            "static_location": static_location,
            "package_files_location": package_files_location(site.package_files),
        },
    )


def render_standalone(site: Site, standalone: Standalone, *, site_template: str, main_template: str) -> str:
    user_directive = ""
    if standalone.user is not None:
        group = f" {standalone.group}" if standalone.group else ""
        user_directive = f"user {standalone.user}{group};\n"
    server_config = "\n".join(f"    {line}" if line else "" for line in render_site(site, site_template).splitlines())
    return fill(
        main_template,
        {
            "worker_connections": str(standalone.worker_connections),
            # Two sockets per connection, plus log and temporary files.
            "worker_rlimit_nofile": str(standalone.worker_connections * 2 + 1024),
            "run_dir": str(standalone.run_dir),
            "user_directive": user_directive,
            "error_log_level": standalone.error_log_level,
            "server_config": server_config,
        },
    )


TEMP_DIRECTORIES = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def prepare_run_dir(standalone: Standalone) -> None:
    """Create the run directory and the temporary directories nginx writes request bodies to."""
    for name in TEMP_DIRECTORIES:
        (standalone.run_dir / name).mkdir(parents=True, exist_ok=True)
