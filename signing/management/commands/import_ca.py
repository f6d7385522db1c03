"""Check an existing CA key and certificate and register the certificate."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

from django.core.management.base import CommandError

from signing.ca import CaInvalid, load_ca
from signing.management.ca_command import CaFilesCommand


class Command(CaFilesCommand):
    help = (
        "Validate a CA key and certificate (basicConstraints CA:true, keyUsage keyCertSign, matching key, "
        "currently valid) and register the certificate. The key stays in its file."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        key_file, cert_file = Path(options["key_file"]), Path(options["cert_file"])
        try:
            ca = load_ca(key_file=key_file, cert_file=cert_file)
        except CaInvalid as error:
            raise CommandError(str(error)) from None
        if key_file.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            self.stderr.write(f"warning: {key_file} is readable by other users; chmod 600 it")
        self.register(ca, key_file=key_file, cert_file=cert_file)
