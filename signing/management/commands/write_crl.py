"""Write the CA's current CRL (for the TLS terminator's ssl_crl) to a file or stdout."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from signing import services
from signing.errors import SigningError


class Command(BaseCommand):
    help = "Sign a fresh CRL with the configured CA and write it (PEM) to --output, or stdout."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--output", help="file to replace atomically; stdout when omitted")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            pem = services.crl_pem()
        except SigningError as error:
            raise CommandError(error.message) from None
        output = options.get("output")
        if not output:
            self.stdout.write(pem.decode("ascii"), ending="")
            return
        target = Path(output)
        # Rename over the old file, so the terminator never reads a half-written CRL.
        descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(pem)
            os.chmod(temporary, 0o644)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        self.stdout.write(f"wrote {target}")
