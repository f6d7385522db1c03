"""`manage.py create_roles [--add-user NAME --role operator|viewer]`: safe to run again."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from fleet.roles import ROLES, ensure_roles, grant_role


class Command(BaseCommand):
    help = "Create the viewer and operator groups if missing; optionally give a user one of the roles."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--add-user", metavar="NAME", help="the username to give --role to")
        parser.add_argument("--role", choices=ROLES, help="viewer (read-only) or operator (may change things)")

    def handle(self, *args: Any, add_user: str | None = None, role: str | None = None, **options: Any) -> None:
        if (add_user is None) != (role is None):
            raise CommandError("--add-user and --role go together")
        created = ensure_roles()
        for name in ROLES:
            self.stdout.write(f"role {name}: {'created' if name in created else 'exists'}")
        if add_user is None or role is None:
            return
        User = get_user_model()
        try:
            user = User.objects.get(**{User.USERNAME_FIELD: add_user})
        except User.DoesNotExist:
            raise CommandError(f"no user named {add_user!r}") from None
        if grant_role(user=user, role=role):
            self.stdout.write(self.style.SUCCESS(f"{add_user} now has the {role} role"))
        else:
            self.stdout.write(f"{add_user} already has the {role} role")
