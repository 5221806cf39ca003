#!/usr/bin/env bash
# `make lock`: resolves the test environments afresh, the newest releases that fit, into
#   requirements/test.txt     chatbatch's dependencies and its [dev] extra (.venv; torch left out)
#   requirements/clients.txt  the clients of the conformance suite (.venv-clients)
# then installs them (scripts/bootstrap.sh). Commit the two files: `make test` and CI install
# exactly these versions.
#
# torch is resolved as the CPU build (its wheel is read from TORCH_WHEELS, default /opt/wheels)
# so that the lock holds its CPU dependencies and no CUDA ones, and is left out of the file:
# bootstrap.sh installs torch first, with pip (TORCH_SPEC picks another build).
set -euo pipefail
cd "$(dirname "$0")/.."

wheels=${TORCH_WHEELS:-/opt/wheels}
torch_pin=${TORCH_LOCK_PIN:-torch==2.13.0+cpu}
if ! ls "$wheels"/torch-*+cpu-*.whl >/dev/null 2>&1; then
  echo "make lock resolves torch's CPU build from a local wheel: set TORCH_WHEELS to a folder holding torch-*+cpu-*.whl" >&2
  exit 2
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
if ! .venv/bin/python -m pip install -q -r requirements/uv.txt; then
  echo "could not install uv ($(cat requirements/uv.txt)) from PyPI" >&2
  exit 2
fi
uv=.venv/bin/uv
# One platform and Python, CI's: Linux x86-64, CPython 3.11.
target=(--python-version 3.11 --python-platform x86_64-unknown-linux-gnu --custom-compile-command "make lock" --upgrade --quiet)

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "$torch_pin" >"$constraints"
"$uv" pip compile pyproject.toml --extra dev "${target[@]}" \
  --find-links "$wheels" --constraint "$constraints" --no-emit-package torch \
  --output-file requirements/test.txt
"$uv" pip compile requirements/clients.in "${target[@]}" --output-file requirements/clients.txt

scripts/bootstrap.sh --clients
