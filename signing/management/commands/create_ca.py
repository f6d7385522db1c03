"""Create the certificate authority that signs agents' client certificates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from opamp.config_signature import SigningKeyError
from signing.ca import CA_KEY_TYPES, certificate_fingerprint, create_ca, write_ca
from signing.configured_ca import certificate_authority_register


class Command(BaseCommand):
    help = (
        "Create a self-signed CA for agent client certificates: the key (mode 0600) and the certificate "
        "are written to new files, never over existing ones."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--key-file", required=True)
        parser.add_argument("--cert-file", required=True)
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
        certificate_authority_register(ca=ca, actor=None)
        self.stdout.write(f"CA subject:     {ca.cert.subject.rfc4514_string()}")
        self.stdout.write(f"SHA-256:        {certificate_fingerprint(ca.cert)}")
        self.stdout.write(f"valid until:    {ca.cert.not_valid_after_utc.isoformat()}")
        self.stdout.write(f"set OPAMP_CA_KEY_FILE={key_file.resolve()}")
        self.stdout.write(f"set OPAMP_CA_CERT_FILE={cert_file.resolve()}")
