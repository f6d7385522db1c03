"""Check an existing CA key and certificate and register the certificate."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from signing.ca import CaInvalid, certificate_fingerprint, load_ca
from signing.configured_ca import certificate_authority_register


class Command(BaseCommand):
    help = (
        "Validate a CA key and certificate (basicConstraints CA:true, keyUsage keyCertSign, matching key, "
        "currently valid) and register the certificate. The key stays in its file."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--key-file", required=True)
        parser.add_argument("--cert-file", required=True)

    def handle(self, *args: Any, **options: Any) -> None:
        key_file, cert_file = Path(options["key_file"]), Path(options["cert_file"])
        try:
            ca = load_ca(key_file=key_file, cert_file=cert_file)
        except CaInvalid as error:
            raise CommandError(str(error)) from None
        if key_file.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            self.stderr.write(f"warning: {key_file} is readable by other users; chmod 600 it")
        certificate_authority_register(ca=ca, actor=None)
        self.stdout.write(f"CA subject:     {ca.cert.subject.rfc4514_string()}")
        self.stdout.write(f"SHA-256:        {certificate_fingerprint(ca.cert)}")
        self.stdout.write(f"valid until:    {ca.cert.not_valid_after_utc.isoformat()}")
        self.stdout.write(f"set OPAMP_CA_KEY_FILE={key_file.resolve()}")
        self.stdout.write(f"set OPAMP_CA_CERT_FILE={cert_file.resolve()}")
