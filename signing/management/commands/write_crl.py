"""Write the CA's current CRL (for the TLS terminator's ssl_crl) to a file or stdout."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from signing.crl import crl_pem, crl_write
from signing.errors import SigningError


class Command(BaseCommand):
    help = (
        "Sign a fresh CRL with the configured CA and write it (PEM) to --output "
        "(default: OPAMP_CRL_FILE), or to stdout when neither is set or --output - is given."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--output", help="file to replace atomically; '-' for stdout")

    def handle(self, *args: Any, **options: Any) -> None:
        output = options.get("output") or settings.OPAMP_CRL_FILE
        try:
            if not output or output == "-":
                self.stdout.write(crl_pem().decode("ascii"), ending="")
                return
            target = crl_write(output)
        except SigningError as error:
            raise CommandError(error.message) from None
        except OSError as error:
            raise CommandError(f"cannot write {output}: {error.strerror or error}") from None
        self.stdout.write(f"wrote {target}")
