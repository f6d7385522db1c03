"""Shared settings and the embedded default profile.

The embedded default runs with nothing installed but Python: SQLite, an in-process
channel layer and a Celery broker kept in a SQLite file. `production.py` swaps in
PostgreSQL and Redis.
"""

from __future__ import annotations

from pathlib import Path

from opamp_site.env import database_from_url, database_pool, env_bool, env_float, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent.parent
VAR_DIR = Path(env_str("OPAMP_VAR_DIR", str(BASE_DIR / "var")))

SECRET_KEY = env_str("DJANGO_SECRET_KEY", "embedded-default-insecure-key-change-me-in-production")
DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "django_celery_beat",
    "channels",
    "fleet",
    "rollouts",
    "signing",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # NUL or a lone surrogate in a path, query parameter or cookie: 400 (fleet.safe_text).
    "fleet.api.strict_input.UnsafeTextMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "opamp_site.urls"
ASGI_APPLICATION = "opamp_site.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# PostgreSQL connections per process: a pool (psycopg's, through Django), opened lazily.
# Budget: server processes x MAX_SIZE + the Celery processes (each uses one connection at a
# time) under PostgreSQL's max_connections (100 by default, 3 reserved for superusers):
# four server processes at 16 plus a worker and beat leave room for manage.py and psql.
OPAMP_DB_POOL_MIN_SIZE = env_int("OPAMP_DB_POOL_MIN_SIZE", 2)
OPAMP_DB_POOL_MAX_SIZE = env_int("OPAMP_DB_POOL_MAX_SIZE", 16)
# Seconds a thread waits for a free connection before its query fails (PoolTimeout).
OPAMP_DB_POOL_TIMEOUT = env_float("OPAMP_DB_POOL_TIMEOUT", 10.0)

DATABASES = {
    "default": database_from_url(
        env_str("DATABASE_URL", f"sqlite:///{VAR_DIR / 'opamp.sqlite3'}"),
        base_dir=BASE_DIR,
        pool=database_pool(
            min_size=OPAMP_DB_POOL_MIN_SIZE, max_size=OPAMP_DB_POOL_MAX_SIZE, timeout=OPAMP_DB_POOL_TIMEOUT
        ),
    )
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"

# `packages`: where uploaded package files are kept (rollouts.package_files), through
# Django's storage API so that any backend serves in production; a local directory by default.
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    "packages": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": env_str("OPAMP_PACKAGE_DIR", str(VAR_DIR / "packages"))},
    },
}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    # Every endpoint checks roles (viewer reads, operator writes), unless it says otherwise.
    "DEFAULT_PERMISSION_CLASSES": ["fleet.api.permissions.RolePermission"],
    "DEFAULT_PAGINATION_CLASS": "fleet.api.pagination.BoundedLimitOffsetPagination",
    "PAGE_SIZE": 100,
    "DEFAULT_FILTER_BACKENDS": [
        "django_filters.rest_framework.DjangoFilterBackend",
        "rest_framework.filters.OrderingFilter",
    ],
    # JSON bodies only, refused with a NUL or a lone surrogate anywhere (fleet.safe_text).
    "DEFAULT_PARSER_CLASSES": ["fleet.api.strict_input.JSONParser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    # Domain errors (rollouts.errors.DomainError and the validation errors of config files
    # and selectors) become 400s with one body shape; everything else is DRF's default.
    "EXCEPTION_HANDLER": "fleet.api.exceptions.api_exception_handler",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "OpAMP control plane API",
    "DESCRIPTION": "Fleet inventory and management of OpAMP agents.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["fleet.api.permissions.RolePermission"],
    # Choice sets that share a field name with another (state) or appear under two field
    # names (reason, revocation_reason) get one explicit name each.
    "ENUM_NAME_OVERRIDES": {
        "CertificateRequestStateEnum": "signing.models.CertificateRequest.State",
        "RevocationReasonEnum": "signing.models.IssuedCertificate.RevocationReason",
        "DeliveryStateEnum": "fleet.pending_deliveries.DELIVERY_STATE_CHOICES",
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("OPAMP_LOG_LEVEL", "INFO")},
    "loggers": {
        "daphne": {"level": "WARNING"},
        "django.channels.server": {"level": "WARNING"},
        # The GC summary is one line a minute at most; kept at INFO under a quieter root.
        "opamp.gc": {"level": "INFO"},
    },
}

# --- Celery -----------------------------------------------------------------------------
# The embedded default keeps its queue in a SQLite file so one command needs no broker.
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", f"sqla+sqlite:///{VAR_DIR / 'celery-broker.sqlite3'}")
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TIMEZONE = TIME_ZONE
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"

# --- OpAMP ------------------------------------------------------------------------------
# Largest AgentToServer accepted, measured after decompression (WS close 1009, HTTP 413).
OPAMP_MAX_MESSAGE_BYTES = env_int("OPAMP_MAX_MESSAGE_BYTES", 64 * 1024 * 1024)
# The server (opamp_site/server.py) gives a request's headers this long from its first
# byte, and its body this long from the end of the headers; then 408 and the connection
# is closed.
OPAMP_HTTP_HEADER_TIMEOUT_SECONDS = env_float("OPAMP_HTTP_HEADER_TIMEOUT_SECONDS", 15.0)
OPAMP_HTTP_BODY_TIMEOUT_SECONDS = env_float("OPAMP_HTTP_BODY_TIMEOUT_SECONDS", 60.0)
# A WebSocket must send its first message this long after it is accepted (else closed);
# after that, one that sends nothing for the offline timeout (heartbeat interval times
# missed heartbeats) is closed as well.
OPAMP_WS_FIRST_MESSAGE_TIMEOUT_SECONDS = env_float("OPAMP_WS_FIRST_MESSAGE_TIMEOUT_SECONDS", 30.0)
# The interval agents are expected to report at; the offline timeout derives from it.
OPAMP_HEARTBEAT_INTERVAL_SECONDS = env_float("OPAMP_HEARTBEAT_INTERVAL_SECONDS", 30.0)
# An agent is offline after this many heartbeat intervals without a message.
OPAMP_OFFLINE_AFTER_MISSED_HEARTBEATS = env_float("OPAMP_OFFLINE_AFTER_MISSED_HEARTBEATS", 3.0)
# How often buffered per-agent facts (heartbeats: last_seen, sequence_num; config offers)
# are written in one batch.
OPAMP_HEARTBEAT_FLUSH_SECONDS = env_float("OPAMP_HEARTBEAT_FLUSH_SECONDS", 2.0)
# How often buffered status reports (config status, health, effective config) of known
# agents are written in one batch; the rollout gate and the inventory trail by this much.
OPAMP_STATUS_FLUSH_SECONDS = env_float("OPAMP_STATUS_FLUSH_SECONDS", 0.5)
# Admission pacing per process (fleet/admission.py): tokens per second (0: no pacing), how
# many may be saved up, what a new or changed agent costs, and what a known agent
# reconnecting unchanged costs.
OPAMP_ADMISSION_RATE = env_float("OPAMP_ADMISSION_RATE", 0.0)
OPAMP_ADMISSION_BURST = env_float("OPAMP_ADMISSION_BURST", 200.0)
OPAMP_ADMISSION_FULL_COST = env_float("OPAMP_ADMISSION_FULL_COST", 4.0)
OPAMP_ADMISSION_RECONNECT_COST = env_float("OPAMP_ADMISSION_RECONNECT_COST", 1.0)
# A polling agent that has not acknowledged an offered config is offered it again after this.
OPAMP_REMOTE_CONFIG_REOFFER_SECONDS = env_float("OPAMP_REMOTE_CONFIG_REOFFER_SECONDS", 120.0)
# How often Celery beat checks the gates of running rollouts.
OPAMP_ROLLOUT_TICK_SECONDS = env_int("OPAMP_ROLLOUT_TICK_SECONDS", 5)
# A running (or rolling back) rollout whose gate has not checked it for this many tick
# intervals is shown as stale by the API and the rollout page: beat, the worker or the
# broker is not running.
OPAMP_ROLLOUT_GATE_STALE_TICKS = env_float("OPAMP_ROLLOUT_GATE_STALE_TICKS", 4.0)
# The rollout gate counts an agent that has not answered as pending (its stage waits) while
# it was heard from within this many seconds, even if its socket closed since; after that
# it is offline and leaves the denominator. Default: the offline timeout (heartbeat interval
# times missed heartbeats, plus a flush: 92 s with the defaults).
OPAMP_ROLLOUT_OFFLINE_GRACE_SECONDS = env_float(
    "OPAMP_ROLLOUT_OFFLINE_GRACE_SECONDS",
    OPAMP_HEARTBEAT_INTERVAL_SECONDS * OPAMP_OFFLINE_AFTER_MISSED_HEARTBEATS + OPAMP_HEARTBEAT_FLUSH_SECONDS,
)
# A stage holds (never succeeds or advances) while more than this share of its targets is
# offline: the answers of the rest are too small a part of it to promote on.
OPAMP_ROLLOUT_MAX_OFFLINE_SHARE = env_float("OPAMP_ROLLOUT_MAX_OFFLINE_SHARE", 0.5)
# A restart is not asked again while one is pending or was asked within this many seconds.
OPAMP_RESTART_MIN_INTERVAL_SECONDS = env_int("OPAMP_RESTART_MIN_INTERVAL_SECONDS", 300)
# A restart not delivered within this many seconds of its request expires: never delivered,
# and no longer holding back a new one (an agent that never came back).
OPAMP_COMMAND_TTL_SECONDS = env_int("OPAMP_COMMAND_TTL_SECONDS", 3600)
# Custom messages: the bytes kept of each one (agents' and operators'), how many an agent's
# history keeps, how many may wait for one agent.
OPAMP_CUSTOM_MESSAGE_MAX_BYTES = env_int("OPAMP_CUSTOM_MESSAGE_MAX_BYTES", 64 * 1024)
OPAMP_CUSTOM_MESSAGE_HISTORY = env_int("OPAMP_CUSTOM_MESSAGE_HISTORY", 50)
OPAMP_CUSTOM_MESSAGE_QUEUE = env_int("OPAMP_CUSTOM_MESSAGE_QUEUE", 50)
# An operator's custom message not delivered within this many seconds expires (never
# delivered, no longer taking a place in the agent's queue).
OPAMP_CUSTOM_MESSAGE_TTL_SECONDS = env_int("OPAMP_CUSTOM_MESSAGE_TTL_SECONDS", 3600)
# How long the log of changed assignments is kept; a server process that has not caught up
# with it for longer re-reads every agent's desired config once (rollouts.desired_state).
OPAMP_DESIRED_STATE_LOG_RETENTION_SECONDS = env_int("OPAMP_DESIRED_STATE_LOG_RETENTION_SECONDS", 3600)
# The desired-state reconciler (rollouts.reconciler): how often it runs, and how many agents
# (by id, continuing where it stopped) each run checks; 5,000 a minute covers 50,000 agents
# every ten minutes.
OPAMP_RECONCILE_SECONDS = env_int("OPAMP_RECONCILE_SECONDS", 60)
OPAMP_RECONCILE_BATCH_SIZE = env_int("OPAMP_RECONCILE_BATCH_SIZE", 5000)
# Limits on published configuration versions.
OPAMP_CONFIG_MAX_FILE_BYTES = env_int("OPAMP_CONFIG_MAX_FILE_BYTES", 1024 * 1024)
OPAMP_CONFIG_MAX_TOTAL_BYTES = env_int("OPAMP_CONFIG_MAX_TOTAL_BYTES", 4 * 1024 * 1024)
OPAMP_CONFIG_MAX_FILES = env_int("OPAMP_CONFIG_MAX_FILES", 64)
# The largest REST request body (Django reads it into memory; 413 over it). A version's
# files travel as JSON strings: room for twice the total (quotes, backslashes and newlines
# are escaped to two bytes each) and the rest of the request.
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("OPAMP_API_MAX_BODY_BYTES", 2 * OPAMP_CONFIG_MAX_TOTAL_BYTES + 1024 * 1024)
# Packages: the largest file an upload may store (413 over it), how long a download URL
# given in an offer stays valid, and the URL downloads are served under (empty: the scheme
# and host the agent reached OpAMP on).
OPAMP_PACKAGE_MAX_BYTES = env_int("OPAMP_PACKAGE_MAX_BYTES", 512 * 1024 * 1024)
OPAMP_PACKAGE_URL_SECONDS = env_int("OPAMP_PACKAGE_URL_SECONDS", 3600)
OPAMP_PACKAGE_DOWNLOAD_BASE_URL = env_str("OPAMP_PACKAGE_DOWNLOAD_BASE_URL", "")
# Behind nginx: the `internal` location (e.g. /_internal/package-files/) that aliases the
# packages directory; a download the app authorised is handed to nginx there with
# X-Accel-Redirect (rollouts.package_downloads). Empty: the app streams the bytes itself.
# render_nginx_config renders the location from the same value.
OPAMP_PACKAGE_DOWNLOAD_ACCEL_PREFIX = env_str("OPAMP_PACKAGE_DOWNLOAD_ACCEL_PREFIX", "")
# Caps applied to what agents report before it is stored.
OPAMP_MAX_ATTRIBUTE_VALUE_CHARS = env_int("OPAMP_MAX_ATTRIBUTE_VALUE_CHARS", 4096)
OPAMP_MAX_ATTRIBUTES = env_int("OPAMP_MAX_ATTRIBUTES", 256)
OPAMP_MAX_VALUE_DEPTH = env_int("OPAMP_MAX_VALUE_DEPTH", 8)
OPAMP_MAX_EFFECTIVE_CONFIG_BYTES = env_int("OPAMP_MAX_EFFECTIVE_CONFIG_BYTES", 1024 * 1024)
# Serve static files from the ASGI process (the embedded default has no web server in front).
OPAMP_SERVE_STATIC = env_bool("OPAMP_SERVE_STATIC", True)
# Refuse to start on protobuf's pure-Python backend (19x slower than upb).
OPAMP_REQUIRE_UPB = env_bool("OPAMP_REQUIRE_UPB", True)
# Server-process garbage collector thresholds for many long-lived connections, and whether
# what survives a generation-1 collection is frozen (opamp/runtime.py tune_gc_for_connections).
OPAMP_GC_THRESHOLD = tuple(int(x) for x in env_list("OPAMP_GC_THRESHOLD", ["10000", "5", "1000"]))
OPAMP_GC_FREEZE_SURVIVORS = env_bool("OPAMP_GC_FREEZE_SURVIVORS", True)
# With survivors frozen, a cycle that dies frozen is found only by a full collection of the
# frozen objects: one every OPAMP_GC_FROZEN_SWEEP_SECONDS (0: never; opamp/runtime.py).
OPAMP_GC_FROZEN_SWEEP_SECONDS = env_float("OPAMP_GC_FROZEN_SWEEP_SECONDS", 3600.0)
# Every collection is timed (opamp/runtime.py); one longer than this is logged (opamp.gc),
# and a summary per generation (count, total, longest) every OPAMP_GC_REPORT_SECONDS when
# there were collections (0: no log lines, the counters only).
OPAMP_GC_PAUSE_LOG_MS = env_float("OPAMP_GC_PAUSE_LOG_MS", 100.0)
OPAMP_GC_REPORT_SECONDS = env_float("OPAMP_GC_REPORT_SECONDS", 60.0)

# --- Signing and identity ---------------------------------------------------------------
# Private keys live only in these files (0600), never in the database or API output.
# Ed25519 key that signs configuration versions; empty = configs are not signed.
OPAMP_SIGNING_KEY_FILE = env_str("OPAMP_SIGNING_KEY_FILE", "")
# Further trusted public keys (*.pem), e.g. the next key published ahead of a rotation.
OPAMP_SIGNING_EXTRA_PUBLIC_KEYS_DIR = env_str("OPAMP_SIGNING_EXTRA_PUBLIC_KEYS_DIR", "")
# The agents' certificate authority (manage.py create_ca / import_ca); empty = no CSR flow.
OPAMP_CA_KEY_FILE = env_str("OPAMP_CA_KEY_FILE", "")
OPAMP_CA_CERT_FILE = env_str("OPAMP_CA_CERT_FILE", "")
# Validity of issued agent certificates, capped by the maximum (and by the CA's own expiry).
OPAMP_CERT_VALIDITY_DAYS = env_int("OPAMP_CERT_VALIDITY_DAYS", 90)
OPAMP_CERT_MAX_VALIDITY_DAYS = env_int("OPAMP_CERT_MAX_VALIDITY_DAYS", 90)
# CSRs accepted from one agent per hour (refused ones count too).
OPAMP_CSR_MAX_PER_HOUR = env_int("OPAMP_CSR_MAX_PER_HOUR", 10)
# How far ahead a CRL's nextUpdate is set.
OPAMP_CRL_NEXT_UPDATE_HOURS = env_int("OPAMP_CRL_NEXT_UPDATE_HOURS", 24)
# Where a fresh CRL is written after every revocation (the TLS terminator reads it);
# empty = only on demand (`manage.py write_crl`, GET /api/v1/ca/crl/).
OPAMP_CRL_FILE = env_str("OPAMP_CRL_FILE", "")

# --- Agent credentials on the OpAMP endpoints -------------------------------------------
# "required": every OpAMP connection presents an enrollment token (Authorization: Bearer)
# or a client certificate issued by our CA; anything else gets 401 (HTTP) or a refused
# handshake (WebSocket). "open": agents without a credential are admitted too (a presented
# credential is still checked). The embedded default is open so that a fresh clone works
# with any OpAMP client; the production profile requires credentials.
OPAMP_AGENT_AUTH = env_str("OPAMP_AGENT_AUTH", "open")
# Proxies (IPs or CIDRs) whose X-Client-Cert / X-Client-Verify headers are believed: the
# TLS terminator that verified the client certificate. From anyone else they are ignored.
OPAMP_TRUSTED_PROXIES = env_list("OPAMP_TRUSTED_PROXIES", [])
# The OpAMP URL agents are told to use in connection settings offers; empty = the URL the
# agent reached us on (scheme and host as forwarded by a trusted proxy).
OPAMP_AGENT_ENDPOINT = env_str("OPAMP_AGENT_ENDPOINT", "")
