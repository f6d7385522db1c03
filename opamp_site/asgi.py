"""ASGI entry point: OpAMP over WebSocket and HTTP at /v1/opamp, Django for the rest.

Served by daphne through opamp_site/server.py (its bounds on bodies, timeouts and message
sizes): `python -m opamp_site.server -b 0.0.0.0 -p 4320 opamp_site.asgi:application`.
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "opamp_site.settings.base")

from django.core.asgi import get_asgi_application

# Django must be set up before the consumers (and their models) are imported.
django_application = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402
from django.urls import path, re_path  # noqa: E402

from fleet.consumers import OpampConsumer  # noqa: E402
from fleet.http_transport import opamp_http_app  # noqa: E402
from opamp.runtime import FrozenGarbageSweeper, GcPauseMonitor, tune_gc_for_connections  # noqa: E402
from opamp_site.body_limit import BodyLimit, web_body_limit  # noqa: E402

OPAMP_PATH = "v1/opamp"

# The embedded default serves the admin's static files itself; production leaves them to nginx.
web_application = ASGIStaticFilesHandler(django_application) if settings.OPAMP_SERVE_STATIC else django_application
# Django spools a whole body before its views run: refuse one larger than any view takes first.
web_application = BodyLimit(
    web_application,
    web_body_limit(
        package_max_bytes=settings.OPAMP_PACKAGE_MAX_BYTES, api_max_body_bytes=settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    ),
)

application = ProtocolTypeRouter(
    {
        "http": URLRouter(
            [
                path(OPAMP_PATH, opamp_http_app),
                re_path(r"", web_application),
            ]
        ),
        "websocket": URLRouter([path(OPAMP_PATH, OpampConsumer.as_asgi())]),
    }
)

tune_gc_for_connections(tuple(settings.OPAMP_GC_THRESHOLD), freeze_survivors=settings.OPAMP_GC_FREEZE_SURVIVORS)
gc_pauses = GcPauseMonitor(
    log_over_seconds=settings.OPAMP_GC_PAUSE_LOG_MS / 1000, report_every_seconds=settings.OPAMP_GC_REPORT_SECONDS
)
gc_pauses.install()
if settings.OPAMP_GC_FREEZE_SURVIVORS:
    FrozenGarbageSweeper(every_seconds=settings.OPAMP_GC_FROZEN_SWEEP_SECONDS).install()
