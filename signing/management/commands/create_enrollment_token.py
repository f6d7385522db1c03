"""Create an enrollment token and print its secret (shown this once only)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from signing.enrollment_tokens import enrollment_token_create
from signing.errors import SigningError


class Command(BaseCommand):
    help = "Create an enrollment token; the secret is printed once and stored only as a hash."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--name", required=True)
        parser.add_argument("--expires-in-hours", type=float, default=24.0)
        parser.add_argument("--max-uses", type=int, default=1)
        parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
        parser.add_argument("--auto-approve", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        labels: dict[str, str] = {}
        for item in options["label"]:
            key, separator, value = item.partition("=")
            if not separator:
                raise CommandError(f"--label must be KEY=VALUE, got {item!r}")
            labels[key] = value
        try:
            token, secret = enrollment_token_create(
                name=options["name"],
                expires_in=timedelta(hours=options["expires_in_hours"]),
                max_uses=options["max_uses"],
                labels=labels,
                auto_approve=options["auto_approve"],
                actor=None,
            )
        except SigningError as error:
            raise CommandError(error.message) from None
        self.stdout.write(f"token {token.name!r} ({token.prefix}…), expires {token.expires_at.isoformat()}")
        self.stdout.write(secret)
