"""Test profile: the embedded default, or production services when OPAMP_TEST_PROFILE=production.

CI sets OPAMP_TEST_PROFILE=production with DATABASE_URL and REDIS_URL; then a missing
service is an error, never a silent skip.

On PostgreSQL, pytest and the server processes tests start (tests/support/live_server.py)
use production's connection pool. A thread of a test's own that reaches the ORM closes its
connection, which returns it to the pool (tests/conftest.py does it for asgiref's and for
channels' test communicators): one still out when the run ends keeps the test database
from being dropped, and enough of them exhaust the pool.
"""

from __future__ import annotations

import os

from opamp_site.env import env_bool, env_float, env_str

if os.environ.get("OPAMP_TEST_PROFILE", "default") == "production":
    os.environ.setdefault("DJANGO_SECRET_KEY", "test-secret-key-not-for-production-use-0123456789")
    from opamp_site.settings.production import *  # noqa: F403
else:
    from opamp_site.settings.base import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
CELERY_TASK_ALWAYS_EAGER = False

# Open unless a test (or the server process it starts) asks for credentials: most tests
# speak for agents without any, and the credential tests switch this on themselves.
OPAMP_AGENT_AUTH = env_str("OPAMP_AGENT_AUTH", "open")

# No admission pacing unless a test (or its server process) asks for it: most tests connect
# their agents at once and time what follows.
OPAMP_ADMISSION_RATE = env_float("OPAMP_ADMISSION_RATE", 0.0)

# A test process sets up and drops thousands of short-lived objects that form cycles
# (databases, model states): frozen, they would never be freed. The servers tests start
# read this too; a test of the freezing asks for it.
OPAMP_GC_FREEZE_SURVIVORS = env_bool("OPAMP_GC_FREEZE_SURVIVORS", False)
