"""What the commands that set up the agent CA from files share: the two file options, and
registering the CA with what the operator then sets in the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand

from signing.ca import LoadedCa, certificate_fingerprint
from signing.configured_ca import certificate_authority_register


class CaFilesCommand(BaseCommand):
    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--key-file", required=True)
        parser.add_argument("--cert-file", required=True)

    def register(self, ca: LoadedCa, *, key_file: Path, cert_file: Path) -> None:
        """Register the CA and print what it is and the settings that point at its files."""
        certificate_authority_register(ca=ca, actor=None)
        self.stdout.write(f"CA subject:     {ca.cert.subject.rfc4514_string()}")
        self.stdout.write(f"SHA-256:        {certificate_fingerprint(ca.cert)}")
        self.stdout.write(f"valid until:    {ca.cert.not_valid_after_utc.isoformat()}")
        self.stdout.write(f"set OPAMP_CA_KEY_FILE={key_file.resolve()}")
        self.stdout.write(f"set OPAMP_CA_CERT_FILE={cert_file.resolve()}")
