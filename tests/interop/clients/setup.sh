#!/usr/bin/env bash
# Installs the two real OpAMP clients used by the interop tests. Idempotent: a step
# is skipped when its pinned inputs have not changed since the last successful run.
#
#   - npm:  @elastic/opamp-client-node (package-lock.json)  -> ./node_modules
#   - PyPI: opentelemetry-opamp-client (requirements.txt)   -> ./.venv-opamp-client
#
# Needs: Python 3.11 (python3.11, or $PYTHON), Node.js >= 20.6 and npm.
# FORCE=1 reinstalls both.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"

VENV="$HERE/.venv-opamp-client"
FORCE="${FORCE:-0}"

say() { printf 'opamp-clients setup: %s\n' "$*" >&2; }

sha() { sha256sum "$@" | sha256sum | cut -d' ' -f1; }

pick_python() {
    if [ -n "${PYTHON:-}" ]; then
        echo "$PYTHON"
    elif command -v python3.11 >/dev/null 2>&1; then
        echo python3.11
    else
        echo python3
    fi
}

# --- Node client -------------------------------------------------------------
command -v node >/dev/null 2>&1 || { say "node is not installed"; exit 1; }
command -v npm >/dev/null 2>&1 || { say "npm is not installed"; exit 1; }
node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a===20&&b>=6)?0:1)' \
    || { say "Node.js >= 20.6 required, found $(node --version)"; exit 1; }

node_stamp="$(sha package.json package-lock.json)-$(node --version)"
if [ "$FORCE" != 1 ] && [ -f node_modules/.setup-stamp ] \
    && [ "$(cat node_modules/.setup-stamp)" = "$node_stamp" ] \
    && [ -f node_modules/@elastic/opamp-client-node/package.json ]; then
    say "node client up to date"
else
    say "installing node client (npm ci)"
    npm ci --no-audit --no-fund --loglevel=error
    echo "$node_stamp" > node_modules/.setup-stamp
fi
node -e 'require("@elastic/opamp-client-node")' \
    || { say "@elastic/opamp-client-node does not load"; exit 1; }

# --- Python client -----------------------------------------------------------
PY="$(pick_python)"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
    || { say "$PY is older than 3.10"; exit 1; }

py_stamp="$(sha requirements.txt)-$("$PY" -c 'import sys; print(sys.version.split()[0])')"
if [ "$FORCE" != 1 ] && [ -f "$VENV/.setup-stamp" ] \
    && [ "$(cat "$VENV/.setup-stamp")" = "$py_stamp" ] \
    && "$VENV/bin/python" -c 'import opentelemetry._opamp' >/dev/null 2>&1; then
    say "python client up to date"
else
    say "installing python client into $VENV"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV" \
        || { say "'$PY -m venv' failed (on Debian: apt-get install python3-venv)"; exit 1; }
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
        -r requirements.txt
    echo "$py_stamp" > "$VENV/.setup-stamp"
fi
"$VENV/bin/python" -c 'import opentelemetry._opamp' \
    || { say "opentelemetry-opamp-client does not load"; exit 1; }

say "ready: node $(node --version), python client in $VENV"
