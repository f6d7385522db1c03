"""Create the certificate authority that signs agents' client certificates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import CommandError

from opamp.config_signature import SigningKeyError
from signing.ca import CA_KEY_TYPES, create_ca, write_ca
from signing.management.ca_command import CaFilesCommand


class Command(CaFilesCommand):
    help = (
        "Create a self-signed CA for agent client certificates: the key (mode 0600) and the certificate "
        "are written to new files, never over existing ones."
    )

    def add_arguments(self, parser: Any) -> None:
        super().add_arguments(parser)
        parser.add_argument("--common-name", default="OpAMP agent CA")
        parser.add_argument("--days", type=int, default=3650)
        parser.add_argument("--key-type", choices=CA_KEY_TYPES, default="ecdsa-p256")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["days"] < 1:
            raise CommandError("--days must be at least 1")
        key_file, cert_file = Path(options["key_file"]), Path(options["cert_file"])
        for path in (key_file, cert_file):
            if path.exists():
                raise CommandError(f"refusing to overwrite the existing file {path}")
        ca = create_ca(common_name=options["common_name"], days=options["days"], key_type=options["key_type"])
        try:
            write_ca(ca, key_file=key_file, cert_file=cert_file)
        except (SigningKeyError, OSError) as error:
            raise CommandError(str(error)) from None
        self.register(ca, key_file=key_file, cert_file=cert_file)
