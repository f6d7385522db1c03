"""Project package: settings, ASGI entry point, URLs and the Celery application."""

from opamp_site.celery import app as celery_app

__all__ = ["celery_app"]
