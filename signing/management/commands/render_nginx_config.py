"""Render the nginx configuration that terminates TLS (with agent client certificates) in front of daphne."""

from __future__ import annotations

import grp
import math
import pwd
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.files.storage import FileSystemStorage, storages
from django.core.management.base import BaseCommand, CommandError

from signing import nginx_config
from signing.crl import crl_pem, write_public_file_atomically
from signing.errors import SigningError

TEMPLATE_DIR = Path(settings.BASE_DIR) / "deploy" / "nginx"
SITE_TEMPLATE = TEMPLATE_DIR / "opamp.conf.template"
STANDALONE_TEMPLATE = TEMPLATE_DIR / "nginx-standalone.conf.template"
# The storage rollouts.package_files keeps package bytes in (named here: signing sits below
# rollouts and does not import it).
PACKAGE_STORAGE = "packages"


def _absolute(value: str) -> Path:
    return Path(value).expanduser().absolute()


def _package_storage_directory() -> Path | None:
    storage = storages[PACKAGE_STORAGE]
    return Path(storage.location).absolute() if isinstance(storage, FileSystemStorage) else None


class Command(BaseCommand):
    help = (
        "Render the nginx configuration of the mTLS profile: TLS on --listen, optional client certificates "
        "verified against the agents' CA and its CRL, and everything proxied to daphne at --upstream with "
        "X-Client-Cert, X-Client-Verify, X-Forwarded-For and X-Forwarded-Proto set (never passed through). "
        "By default a server block for nginx's http context (conf.d); with --standalone DIR a complete "
        "nginx.conf that keeps its pid file, logs and temporary files in DIR. Every file is checked first."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--listen",
            action="append",
            metavar="[HOST:]PORT",
            help="address to accept TLS on; repeat for more (default 443; IPv6 as [::]:443)",
        )
        parser.add_argument("--server-name", default="_", help="nginx server_name (default _, any name)")
        parser.add_argument(
            "--upstream",
            action="append",
            help="a daphne process's address, HOST:PORT or unix:/path/to/socket; repeat for each process "
            "(default 127.0.0.1:8000)",
        )
        parser.add_argument("--tls-cert", required=True, help="the server's certificate chain (PEM)")
        parser.add_argument("--tls-key", required=True, help="the server's private key (PEM)")
        parser.add_argument(
            "--ca-cert", help="the agents' CA certificate (PEM); default: the OPAMP_CA_CERT_FILE setting"
        )
        parser.add_argument("--crl", required=True, help="the CA's CRL (PEM), as written by manage.py write_crl")
        parser.add_argument(
            "--write-crl",
            action="store_true",
            help="sign a fresh CRL with the configured CA (OPAMP_CA_KEY_FILE) and write it to --crl first",
        )
        parser.add_argument(
            "--max-body-bytes",
            type=int,
            help="client_max_body_size in bytes; default: the OPAMP_MAX_MESSAGE_BYTES setting",
        )
        parser.add_argument(
            "--package-max-bytes",
            type=int,
            help="client_max_body_size of the package upload route; default: the OPAMP_PACKAGE_MAX_BYTES setting",
        )
        parser.add_argument(
            "--package-accel-prefix",
            help="the internal location nginx serves authorised package downloads from (X-Accel-Redirect); "
            "default: the OPAMP_PACKAGE_DOWNLOAD_ACCEL_PREFIX setting (empty: none, the server streams them)",
        )
        parser.add_argument(
            "--package-dir",
            help="the directory that location aliases; default: the packages storage's (OPAMP_PACKAGE_DIR)",
        )
        parser.add_argument(
            "--websocket-timeout",
            type=int,
            default=3600,
            metavar="SECONDS",
            help="longest silence on an agent's WebSocket before nginx closes it (default 3600)",
        )
        parser.add_argument(
            "--static-root",
            help="serve /static/ from this directory (collectstatic's STATIC_ROOT) instead of proxying it",
        )
        parser.add_argument(
            "--standalone",
            metavar="DIR",
            help="render a complete nginx.conf whose pid file, error and access logs and temporary "
            "directories live in DIR (created); run it with nginx -c",
        )
        parser.add_argument(
            "--user",
            metavar="USER[:GROUP]",
            help="with --standalone: the user nginx's workers run as when started by root",
        )
        parser.add_argument("--error-log-level", default="warn", help="with --standalone (default warn)")
        parser.add_argument(
            "--worker-connections",
            type=int,
            default=40000,
            help="with --standalone: connections per nginx worker, two per agent (default 40000)",
        )
        parser.add_argument("--template", help=f"the server-block template (default {SITE_TEMPLATE})")
        parser.add_argument("--output", help="file to replace atomically; stdout when omitted")

    def handle(self, *args: Any, **options: Any) -> None:
        ca_cert = options["ca_cert"] or settings.OPAMP_CA_CERT_FILE
        if not ca_cert:
            raise CommandError("no CA certificate: pass --ca-cert or set OPAMP_CA_CERT_FILE")
        max_body_bytes = options["max_body_bytes"]
        if max_body_bytes is None:
            max_body_bytes = int(settings.OPAMP_MAX_MESSAGE_BYTES)
        site = nginx_config.Site(
            listen=tuple(options["listen"] or ["443"]),
            server_name=options["server_name"],
            upstreams=tuple(options["upstream"] or ["127.0.0.1:8000"]),
            tls_cert=_absolute(options["tls_cert"]),
            tls_key=_absolute(options["tls_key"]),
            ca_cert=_absolute(ca_cert),
            crl=_absolute(options["crl"]),
            max_body_bytes=max_body_bytes,
            websocket_timeout_seconds=options["websocket_timeout"],
            header_timeout_seconds=math.ceil(settings.OPAMP_HTTP_HEADER_TIMEOUT_SECONDS),
            body_timeout_seconds=math.ceil(settings.OPAMP_HTTP_BODY_TIMEOUT_SECONDS),
            package_max_bytes=(
                int(settings.OPAMP_PACKAGE_MAX_BYTES)
                if options["package_max_bytes"] is None
                else options["package_max_bytes"]
            ),
            static_root=_absolute(options["static_root"]) if options["static_root"] else None,
            package_files=self._package_files(options),
        )
        standalone = None
        if options["standalone"]:
            user, _, group = (options["user"] or "").partition(":")
            standalone = nginx_config.Standalone(
                run_dir=_absolute(options["standalone"]),
                user=user or None,
                group=group or None,
                error_log_level=options["error_log_level"],
                worker_connections=options["worker_connections"],
            )
        elif options["user"]:
            raise CommandError("--user applies only to --standalone (a server block has no user directive)")

        problems = nginx_config.value_problems(site, standalone)
        if standalone is not None and standalone.user is not None:
            problems += self._account_problems(standalone)
        if problems:
            raise CommandError(self._describe(problems))

        if options["write_crl"]:
            self._write_crl(site.crl)
        problems = nginx_config.file_problems(site)
        if problems:
            raise CommandError(self._describe(problems))

        template_path = _absolute(options["template"]) if options["template"] else SITE_TEMPLATE
        try:
            site_template = template_path.read_text(encoding="utf-8")
            if standalone is None:
                rendered = nginx_config.render_site(site, site_template)
            else:
                main_template = STANDALONE_TEMPLATE.read_text(encoding="utf-8")
                rendered = nginx_config.render_standalone(
                    site, standalone, site_template=site_template, main_template=main_template
                )
        except OSError as error:
            raise CommandError(f"cannot read the template: {error}") from None
        except KeyError as error:
            raise CommandError(f"{template_path}: {error.args[0]}") from None

        if standalone is not None:
            try:
                nginx_config.prepare_run_dir(standalone)
            except OSError as error:
                raise CommandError(f"--standalone {standalone.run_dir}: {error}") from None
        output = options["output"]
        if not output:
            self.stdout.write(rendered, ending="")
            return
        target = _absolute(output)
        try:
            write_public_file_atomically(target, rendered.encode("utf-8"))
        except OSError as error:
            raise CommandError(f"--output {target}: {error}") from None
        self.stderr.write(f"wrote {target}; check it with: nginx -t -c {target}" if standalone else f"wrote {target}")

    def _package_files(self, options: dict[str, Any]) -> nginx_config.PackageFiles | None:
        prefix = options["package_accel_prefix"]
        if prefix is None:
            prefix = str(settings.OPAMP_PACKAGE_DOWNLOAD_ACCEL_PREFIX)
        if not prefix:
            return None
        directory = _absolute(options["package_dir"]) if options["package_dir"] else _package_storage_directory()
        if directory is None:
            # The application hands nothing to nginx then (rollouts/package_downloads.py).
            self.stderr.write(
                "the packages storage is not a local directory: the server streams package files itself, "
                "and no internal location is rendered for them"
            )
            return None
        return nginx_config.PackageFiles(accel_prefix=prefix, directory=directory)

    def _write_crl(self, path: Path) -> None:
        if not path.parent.is_dir():
            raise CommandError(f"--crl {path}: the directory {path.parent} does not exist")
        try:
            pem = crl_pem()
        except SigningError as error:
            raise CommandError(f"--write-crl: {error.message}") from None
        try:
            write_public_file_atomically(path, pem)
        except OSError as error:
            raise CommandError(f"--crl {path}: {error}") from None
        self.stderr.write(f"wrote the CRL to {path}")

    @staticmethod
    def _account_problems(standalone: nginx_config.Standalone) -> list[str]:
        problems = []
        try:
            pwd.getpwnam(standalone.user or "")
        except KeyError:
            problems.append(f"--user {standalone.user!r}: no such user on this machine")
        group = standalone.group or standalone.user or ""
        try:
            grp.getgrnam(group)
        except KeyError:
            problems.append(f"--user {standalone.user}:{group}: no such group on this machine (name one: USER:GROUP)")
        return problems

    @staticmethod
    def _describe(problems: list[str]) -> str:
        return "cannot render the nginx configuration:\n" + "\n".join(f"  - {problem}" for problem in problems)
