#!/usr/bin/env bash
# Install everything and run the server on the embedded default profile:
# SQLite, in-process channel layer, Celery worker + beat on a SQLite-file broker.
# OpAMP (ws:// and http:// at /v1/opamp), the admin (/admin/) and the API (/api/v1/)
# share one port: OPAMP_PORT (default 4320) on OPAMP_BIND (default 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh requirements.txt
export DJANGO_SETTINGS_MODULE="${DJANGO_SETTINGS_MODULE:-opamp_site.settings.base}"
bind="${OPAMP_BIND:-127.0.0.1}"
port="${OPAMP_PORT:-4320}"
mkdir -p var
.venv/bin/python manage.py migrate --noinput -v0
.venv/bin/python manage.py register_periodic_tasks -v0 >/dev/null

.venv/bin/celery -A opamp_site worker -B --pool=solo --loglevel=WARNING \
    --schedule var/celerybeat-schedule >var/celery.log 2>&1 &
celery_pid=$!
trap 'kill "$celery_pid" 2>/dev/null; wait "$celery_pid" 2>/dev/null' EXIT INT TERM

echo "OpAMP control plane (embedded default profile)"
echo "  OpAMP endpoint: ws://$bind:$port/v1/opamp  and  http://$bind:$port/v1/opamp"
echo "  admin:          http://$bind:$port/admin/"
echo "  REST API:       http://$bind:$port/api/v1/  (schema: /api/v1/schema/)"
.venv/bin/python manage.py ensure_admin | sed 's/^/  /'
echo "  celery worker + beat log: var/celery.log"
.venv/bin/python -m opamp_site.server -b "$bind" -p "$port" opamp_site.asgi:application
