#!/usr/bin/env bash
# Install everything and run the server on the embedded default profile:
# SQLite, in-process channel layer, Celery worker + beat on a SQLite-file broker.
# OpAMP (ws:// and http:// at /v1/opamp), the pages, the admin (/admin/) and the API
# (/api/v1/) share one port: OPAMP_PORT (default 4320) on OPAMP_BIND (default 127.0.0.1).
# Data lives in OPAMP_VAR_DIR (default var/). TERM or INT (Ctrl-C) stops daphne and Celery.
set -euo pipefail
cd "$(dirname "$0")/.."
bind="${OPAMP_BIND:-127.0.0.1}"
port="${OPAMP_PORT:-4320}"
var="${OPAMP_VAR_DIR:-var}"
# Browsers and the printed URLs need an address to connect to, not the wildcard.
host="$bind"; [ "$bind" = "0.0.0.0" ] && host="127.0.0.1"

echo "[1/4] installing the pinned requirements into .venv (the first start takes a minute or two)"
scripts/bootstrap.sh requirements.txt
export DJANGO_SETTINGS_MODULE="${DJANGO_SETTINGS_MODULE:-opamp_site.settings.base}"
mkdir -p "$var"
echo "[2/4] migrating the database in $var/"
.venv/bin/python manage.py migrate --noinput -v0
.venv/bin/python manage.py register_periodic_tasks -v0 >/dev/null

children=()
stop() {
    trap - INT TERM EXIT
    if [ "${#children[@]}" -gt 0 ]; then
        echo "stopping daphne and Celery"
        kill -TERM "${children[@]}" 2>/dev/null || true
        wait "${children[@]}" 2>/dev/null || true
    fi
}
trap 'stop; exit 0' INT TERM
trap stop EXIT

echo "[3/4] starting the Celery worker with beat (log: $var/celery.log)"
.venv/bin/celery -A opamp_site worker -B --pool=solo --loglevel=WARNING \
    --schedule "$var/celerybeat-schedule" >"$var/celery.log" 2>&1 &
children+=($!)
echo "[4/4] starting daphne on $bind:$port"
.venv/bin/python -m opamp_site.server -b "$bind" -p "$port" opamp_site.asgi:application &
children+=($!)
for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null && break
    kill -0 "${children[1]}" 2>/dev/null || { echo "daphne exited; see the lines above" >&2; exit 1; }
    sleep 0.2
done

echo "OpAMP control plane (embedded default profile) is up"
echo "  fleet:          http://$host:$port/fleet/"
echo "  rollouts:       http://$host:$port/rollouts/"
echo "  configurations: http://$host:$port/configurations/"
echo "  certificates:   http://$host:$port/certificate-requests/"
echo "  overview:       http://$host:$port/"
echo "  admin:          http://$host:$port/admin/"
echo "  REST API:       http://$host:$port/api/v1/  (schema: http://$host:$port/api/v1/schema/)"
echo "  OpAMP endpoint: ws://$host:$port/v1/opamp  and  http://$host:$port/v1/opamp"
.venv/bin/python manage.py ensure_admin | sed 's/^/  /'
echo "  Ctrl-C stops the server and Celery"
# Either child ending ends the server: the other is stopped by the EXIT trap.
wait -n "${children[@]}"
