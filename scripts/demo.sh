#!/usr/bin/env bash
# The main job end to end on the embedded default: a local redis-server, a worker serving the
# default model (SmolLM2-135M-Instruct, converted offline once), and examples/sample.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
. .venv/bin/activate

run=.demo
mkdir -p "$run"
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$run" >"$run/redis.log" 2>&1 &
redis_pid=$!
worker_pid=
cleanup() {
  [ -n "$worker_pid" ] && kill -TERM "$worker_pid" 2>/dev/null && wait "$worker_pid" 2>/dev/null
  kill "$redis_pid" 2>/dev/null && wait "$redis_pid" 2>/dev/null
  true
}
trap cleanup EXIT
export CHATBATCH_REDIS_URL="redis://127.0.0.1:$port/0"

echo "== default model (converted once, then cached)"
chatbatch model default

echo "== starting a worker (log: $run/worker.log)"
chatbatch worker >"$run/worker.log" 2>&1 &
worker_pid=$!
for _ in $(seq 1 180); do
  if chatbatch models 2>/dev/null | grep -q '"SmolLM2-135M-Instruct"'; then break; fi
  if ! kill -0 "$worker_pid" 2>/dev/null; then cat "$run/worker.log" >&2; exit 1; fi
  sleep 1
done

echo "== chatbatch submit examples/sample.jsonl --wait"
chatbatch submit examples/sample.jsonl --wait --output "$run/output.jsonl" --errors "$run/errors.jsonl"

echo "== answers ($run/output.jsonl)"
python - "$run/output.jsonl" <<'PY'
import json, sys
for raw in open(sys.argv[1]):
    line = json.loads(raw)
    for choice in line["response"]["body"]["choices"]:
        text = choice["message"]["content"].strip().replace("\n", " ")
        print(f"{line['custom_id']:>12} [{choice['index']}] {text[:100]}")
PY
