"""Test profile: the embedded default, or production services when OPAMP_TEST_PROFILE=production.

CI sets OPAMP_TEST_PROFILE=production with DATABASE_URL and REDIS_URL; then a missing
service is an error, never a silent skip.
"""

from __future__ import annotations

import os

from opamp_site.env import env_int, env_str

if os.environ.get("OPAMP_TEST_PROFILE", "default") == "production":
    os.environ.setdefault("DJANGO_SECRET_KEY", "test-secret-key-not-for-production-use-0123456789")
    from opamp_site.settings.production import *  # noqa: F403
else:
    from opamp_site.settings.base import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
CELERY_TASK_ALWAYS_EAGER = False

# Connections opened by database_sync_to_async threads must not outlive a test, or the
# test database cannot be dropped at the end of the run. Server processes that tests start
# (tests/support/live_server.py) keep theirs, as production does: reconnecting for every
# query made a 2,000-agent drill spend most of its time opening connections.
DATABASES["default"]["CONN_MAX_AGE"] = env_int("OPAMP_DB_CONN_MAX_AGE", 0)  # noqa: F405

# Open unless a test (or the server process it starts) asks for credentials: most tests
# speak for agents without any, and the credential tests switch this on themselves.
OPAMP_AGENT_AUTH = env_str("OPAMP_AGENT_AUTH", "open")
