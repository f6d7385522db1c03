"""manage.py render_nginx_config: what it renders, and what it refuses to render."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from django.core.management import call_command
from django.core.management.base import CommandError

from signing import nginx_config
from signing.ca import LoadedCa, build_crl, write_ca
from signing.file_cache import reset_file_cache
from tests.deploy import pki


@dataclass(frozen=True)
class Files:
    directory: Path
    ca: LoadedCa
    ca_key: Path
    ca_cert: Path
    tls_cert: Path
    tls_key: Path
    crl: Path


@pytest.fixture
def files(tmp_path: Path) -> Files:
    ca = pki.new_ca("Render test CA")
    write_ca(ca, key_file=tmp_path / "ca.key", cert_file=tmp_path / "ca.pem")
    tls_cert, tls_key = pki.issue_server(pki.new_ca("Render test server CA"), tmp_path)
    return Files(
        directory=tmp_path,
        ca=ca,
        ca_key=tmp_path / "ca.key",
        ca_cert=tmp_path / "ca.pem",
        tls_cert=tls_cert,
        tls_key=tls_key,
        crl=pki.write_crl(ca, tmp_path / "agents.crl", []),
    )


@pytest.fixture(autouse=True)
def forget_loaded_files() -> Iterator[None]:
    reset_file_cache()
    yield
    reset_file_cache()


def render(*args: str) -> str:
    out = io.StringIO()
    call_command("render_nginx_config", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def base_args(files: Files) -> list[str]:
    return [
        "--tls-cert", str(files.tls_cert),
        "--tls-key", str(files.tls_key),
        "--ca-cert", str(files.ca_cert),
        "--crl", str(files.crl),
    ]  # fmt: skip


def location(config: str, name: str) -> str:
    match = re.search(rf"location {re.escape(name)} \{{(.*?)\n    \}}", config, re.S)
    assert match, f"no location {name}"
    return match.group(1)


def directives(block: str, name: str) -> list[str]:
    return [line.strip().removesuffix(";") for line in block.splitlines() if line.strip().startswith(f"{name} ")]


def test_the_server_block_holds_the_tls_and_header_contract(files: Files) -> None:
    config = render(
        *base_args(files), "--listen", "127.0.0.1:8443", "--listen", "[::1]:8443", "--upstream", "10.0.0.5:8000"
    )
    assert "listen 127.0.0.1:8443 ssl reuseport;" in config
    assert "listen [::1]:8443 ssl reuseport;" in config
    assert "server 10.0.0.5:8000 max_fails=0;" in config
    assert f"ssl_certificate     {files.tls_cert};" in config
    assert f"ssl_certificate_key {files.tls_key};" in config
    assert "ssl_verify_client      optional;" in config
    assert f"ssl_client_certificate {files.ca_cert};" in config
    assert f"ssl_crl                {files.crl};" in config
    assert "ssl_verify_depth       1;" in config
    assert "ssl_protocols       TLSv1.2 TLSv1.3;" in config
    assert "client_max_body_size 67108864;" in config  # OPAMP_MAX_MESSAGE_BYTES, 64 MiB by default
    assert "{{" not in config
    for name in ("= /v1/opamp", "/"):
        headers = directives(location(config, name), "proxy_set_header")
        assert "proxy_set_header X-Client-Cert $ssl_client_escaped_cert" in headers
        assert "proxy_set_header X-Client-Verify $ssl_client_verify" in headers
        assert "proxy_set_header X-Forwarded-For $remote_addr" in headers
        assert "proxy_set_header X-Forwarded-Proto https" in headers
        assert "proxy_set_header Host $http_host" in headers
    opamp = location(config, "= /v1/opamp")
    assert "proxy_set_header Upgrade $http_upgrade" in directives(opamp, "proxy_set_header")
    assert directives(opamp, "proxy_read_timeout") == ["proxy_read_timeout 3600s"]


def test_defaults_come_from_the_settings(files: Files, settings: Any) -> None:
    settings.OPAMP_CA_CERT_FILE = str(files.ca_cert)
    settings.OPAMP_MAX_MESSAGE_BYTES = 12345
    args = [arg for arg in base_args(files) if arg not in ("--ca-cert", str(files.ca_cert))]
    config = render(*args)
    assert f"ssl_client_certificate {files.ca_cert};" in config
    assert "client_max_body_size 12345;" in config
    assert "client_header_timeout 15s;" in config
    assert "client_body_timeout 60s;" in config
    assert "listen 443 ssl reuseport;" in config
    assert "server 127.0.0.1:8000 max_fails=0;" in config


def test_without_a_ca_certificate_it_says_where_to_give_one(files: Files, settings: Any) -> None:
    settings.OPAMP_CA_CERT_FILE = ""
    args = [arg for arg in base_args(files) if arg not in ("--ca-cert", str(files.ca_cert))]
    with pytest.raises(CommandError, match="pass --ca-cert or set OPAMP_CA_CERT_FILE"):
        render(*args)


def test_every_missing_file_is_named(tmp_path: Path) -> None:
    missing = {name: tmp_path / name for name in ("server.pem", "server.key", "ca.pem", "agents.crl")}
    with pytest.raises(CommandError) as refused:
        render(
            "--tls-cert", str(missing["server.pem"]),
            "--tls-key", str(missing["server.key"]),
            "--ca-cert", str(missing["ca.pem"]),
            "--crl", str(missing["agents.crl"]),
            "--output", str(tmp_path / "opamp.conf"),
        )  # fmt: skip
    message = str(refused.value)
    for option, name in (("--tls-cert", "server.pem"), ("--tls-key", "server.key"), ("--ca-cert", "ca.pem")):
        assert f"{option} {missing[name]}: no such file" in message
    assert f"--crl {missing['agents.crl']}: no such file" in message
    assert not (tmp_path / "opamp.conf").exists()


def test_a_crl_of_another_ca_is_refused(files: Files) -> None:
    pki.write_crl(pki.new_ca("Render test CA"), files.crl, [])  # same name, another key
    with pytest.raises(CommandError, match="not signed by the CA"):
        render(*base_args(files))


def test_an_expired_crl_is_refused(files: Files) -> None:
    files.crl.write_bytes(
        build_crl(
            [],
            ca_key=files.ca.key,
            ca_cert=files.ca.cert,
            next_update_hours=1,
            now=datetime.now(UTC) - timedelta(hours=2),
        )
    )
    with pytest.raises(CommandError, match="expired"):
        render(*base_args(files))


def test_files_that_are_not_what_they_claim_are_refused(files: Files) -> None:
    files.crl.write_text("not a crl")
    args = base_args(files)
    args[args.index("--ca-cert") + 1] = str(files.tls_cert)  # a certificate, not a CA
    with pytest.raises(CommandError) as refused:
        render(*args)
    assert "not a CA certificate" in str(refused.value)
    assert "not a PEM CRL" in str(refused.value)


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--listen", "localhost"], "expected PORT or HOST:PORT"),
        (["--listen", "127.0.0.1:70000"], "port must be a number"),
        (["--listen", "[::1:443"], "[ADDRESS]:PORT"),
        (["--upstream", "8000"], "expected HOST:PORT"),
        (["--upstream", "unix:relative.sock"], "must be absolute"),
        (["--server-name", "a;b"], "--server-name"),
        (["--max-body-bytes", "0"], "--max-body-bytes 0"),
        (["--static-root", "/no/such/dir"], "no such directory"),
    ],
)
def test_bad_values_are_refused(files: Files, args: list[str], problem: str) -> None:
    with pytest.raises(CommandError, match=re.escape(problem)):
        render(*base_args(files), *args)


def test_a_path_nginx_would_misread_is_refused(files: Files) -> None:
    odd = files.directory / "a;b.crl"
    odd.write_bytes(files.crl.read_bytes())
    args = base_args(files)
    args[args.index("--crl") + 1] = str(odd)
    with pytest.raises(CommandError, match="character nginx reads as syntax"):
        render(*args)


def test_static_files_are_served_from_the_static_root_when_given(files: Files) -> None:
    static = files.directory / "static"
    static.mkdir()
    config = render(*base_args(files), "--static-root", str(static))
    assert f"alias {static}/;" in location(config, "/static/")


def test_standalone_keeps_everything_in_its_directory(files: Files) -> None:
    run_dir = files.directory / "run"
    output = files.directory / "nginx.conf"
    render(*base_args(files), "--standalone", str(run_dir), "--output", str(output))
    config = output.read_text()
    assert f"pid {run_dir}/nginx.pid;" in config
    assert f"error_log {run_dir}/error.log warn;" in config
    for name in nginx_config.TEMP_DIRECTORIES:
        assert f"_temp_path {run_dir}/{name};" in config
        assert (run_dir / name).is_dir()
    assert not re.search(r"^user ", config, re.M)
    assert "worker_shutdown_timeout 1h;" in config
    assert "events {" in config and "http {" in config


def test_user_is_only_for_standalone(files: Files) -> None:
    with pytest.raises(CommandError, match="--user applies only to --standalone"):
        render(*base_args(files), "--user", "root")


def test_an_unknown_user_is_refused(files: Files) -> None:
    with pytest.raises(CommandError, match="no such user"):
        render(*base_args(files), "--standalone", str(files.directory / "run"), "--user", "no-such-user-opamp")


def test_placeholders_must_match_exactly() -> None:
    with pytest.raises(KeyError, match="nothing fills"):
        nginx_config.fill("a {{ b }}", {})
    with pytest.raises(KeyError, match="lacks the placeholders c"):
        nginx_config.fill("a {{ b }}", {"b": "1", "c": "2"})


@pytest.mark.django_db
def test_write_crl_writes_the_configured_cas_crl_first(files: Files, settings: Any) -> None:
    settings.OPAMP_CA_KEY_FILE = str(files.ca_key)
    settings.OPAMP_CA_CERT_FILE = str(files.ca_cert)
    fresh = files.directory / "fresh.crl"
    args = base_args(files)
    args[args.index("--crl") + 1] = str(fresh)
    render(*args, "--write-crl")
    crl = x509.load_pem_x509_crl(fresh.read_bytes())
    assert crl.issuer == files.ca.cert.subject
    assert crl.is_signature_valid(files.ca.key.public_key())


@pytest.mark.django_db
def test_write_crl_without_a_configured_ca_says_so(files: Files, settings: Any) -> None:
    settings.OPAMP_CA_KEY_FILE = ""
    settings.OPAMP_CA_CERT_FILE = ""
    fresh = files.directory / "fresh.crl"
    args = base_args(files)
    args[args.index("--crl") + 1] = str(fresh)
    with pytest.raises(CommandError, match="--write-crl"):
        render(*args, "--write-crl")
    assert not fresh.exists()


def test_the_timeouts_come_from_the_servers_settings(files: Files, settings: Any) -> None:
    settings.OPAMP_HTTP_HEADER_TIMEOUT_SECONDS = 7.5
    settings.OPAMP_HTTP_BODY_TIMEOUT_SECONDS = 20
    config = render(*base_args(files))
    assert "client_header_timeout 8s;" in config
    assert "client_body_timeout 20s;" in config
    # Bodies stream to the server, which refuses from the headers.
    assert directives(location(config, "= /v1/opamp"), "proxy_request_buffering") == ["proxy_request_buffering off"]


def test_the_package_upload_route_alone_takes_the_package_limit(files: Files, settings: Any) -> None:
    settings.OPAMP_MAX_MESSAGE_BYTES = 1000
    settings.OPAMP_PACKAGE_MAX_BYTES = 5000
    config = render(*base_args(files))
    # The server's, then the one inside the upload route's location: nowhere else.
    assert directives(config, "client_max_body_size") == ["client_max_body_size 1000", "client_max_body_size 5000"]
    upload = location(config, "/")
    assert "location ~ ^/api/v1/packages/[^/]+/versions/[^/]+/files/$ {" in upload
    assert "client_max_body_size 5000;" in upload.split("location ~ ^/api/v1/packages/")[1]
    assert "client_max_body_size 77;" in render(*base_args(files), "--package-max-bytes", "77")


def test_package_downloads_are_handed_to_an_internal_location_over_the_package_directory(
    files: Files, settings: Any
) -> None:
    package_dir = files.directory / "packages"
    package_dir.mkdir()
    local = {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(package_dir)}}
    settings.STORAGES = {**settings.STORAGES, "packages": local}
    assert "_internal" not in render(*base_args(files))  # OPAMP_PACKAGE_DOWNLOAD_ACCEL_PREFIX empty: none
    settings.OPAMP_PACKAGE_DOWNLOAD_ACCEL_PREFIX = "/_internal/package-files/"
    block = location(render(*base_args(files)), "^~ /_internal/package-files/")
    assert "\n        internal;\n" in block
    assert directives(block, "alias") == [f"alias {package_dir}/"]
    assert directives(block, "try_files") == ["try_files $uri =404"]
    assert directives(block, "autoindex") == ["autoindex off"]
    assert directives(block, "add_header") == ["add_header ETag $upstream_http_etag"]
    other = files.directory / "elsewhere"
    other.mkdir()
    given = render(*base_args(files), "--package-accel-prefix", "/_bytes/", "--package-dir", str(other))
    assert directives(location(given, "^~ /_bytes/"), "alias") == [f"alias {other}/"]


def test_a_package_storage_that_is_not_a_directory_gets_no_location(files: Files, settings: Any) -> None:
    settings.OPAMP_PACKAGE_DOWNLOAD_ACCEL_PREFIX = "/_internal/package-files/"
    settings.STORAGES = {**settings.STORAGES, "packages": {"BACKEND": "django.core.files.storage.InMemoryStorage"}}
    out, err = io.StringIO(), io.StringIO()
    call_command("render_nginx_config", *base_args(files), stdout=out, stderr=err)
    assert "_internal" not in out.getvalue()
    assert "the server streams package files itself" in err.getvalue()


@pytest.mark.parametrize(
    ("prefix", "problem"),
    [
        ("_internal/", "expected a path like"),
        ("/_internal", "expected a path like"),
        ("/", "expected a path like"),
        ("/a b/", "expected a path like"),
        ("/a/../b/", "expected a path like"),
        ("/v1/package-files/", "under one of the application's routes"),
        ("/api/bytes/", "under one of the application's routes"),
    ],
)
def test_a_bad_accel_prefix_is_refused(files: Files, prefix: str, problem: str) -> None:
    package_dir = files.directory / "packages"
    package_dir.mkdir()
    with pytest.raises(CommandError, match=re.escape(problem)):
        render(*base_args(files), "--package-accel-prefix", prefix, "--package-dir", str(package_dir))


def test_a_missing_package_directory_is_refused(files: Files) -> None:
    with pytest.raises(CommandError, match=r"--package-dir .*: no such directory"):
        render(*base_args(files), "--package-accel-prefix", "/_bytes/", "--package-dir", str(files.directory / "none"))
