#!/usr/bin/env bash
# The test command: set up what the tests need (both locked environments), then run them. Extra
# arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --clients
exec .venv/bin/python -m pytest "$@"
