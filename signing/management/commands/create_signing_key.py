"""Create an Ed25519 config-signing key file and publish its public half."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from opamp.config_signature import SigningKeyError
from signing.config_signing import generate_signing_key
from signing.errors import SigningError
from signing.signing_keys import is_configured_signing_key_file, signing_key_register


class Command(BaseCommand):
    help = (
        "Write a new Ed25519 signing key to PATH (PKCS#8 PEM, mode 0600; an existing file is never "
        "overwritten), print its key id and public key, and register the public key as accepted. "
        "It becomes the signing key when OPAMP_SIGNING_KEY_FILE points at PATH."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("path", help="where to write the private key")

    def handle(self, *args: Any, **options: Any) -> None:
        path = options["path"]
        try:
            pair = generate_signing_key(path)
        except (SigningKeyError, OSError) as error:
            raise CommandError(str(error)) from None
        active = is_configured_signing_key_file(path)
        try:
            signing_key_register(public_key_pem=pair.public_key_pem, actor=None, active=active)
        except SigningError as error:
            raise CommandError(error.message) from None
        self.stdout.write(f"key id: {pair.key_id}")
        self.stdout.write(pair.public_key_pem.rstrip("\n"))
        if active:
            self.stdout.write("registered as the active signing key (OPAMP_SIGNING_KEY_FILE names this file)")
        else:
            self.stdout.write(
                "registered as accepted for verification; to sign with it, set "
                f"OPAMP_SIGNING_KEY_FILE={path} and restart"
            )
