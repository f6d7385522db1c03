#!/usr/bin/env bash
# Run the whole test suite. Installs the dev requirements and the third-party OpAMP
# clients used by the interop tests (npm and a separate Python virtualenv) first.
#
# Profile: the embedded default (SQLite, in-memory channel layer) unless
# OPAMP_TEST_PROFILE=production, which needs DATABASE_URL (PostgreSQL) and REDIS_URL.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh requirements-dev.txt
if [ -x tests/interop/clients/setup.sh ]; then
    tests/interop/clients/setup.sh
fi
# The browser tests drive the system chromium (tests/pages/browser.py finds it); Playwright
# must never fetch a browser of its own.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
exec .venv/bin/python -m pytest "$@"
