"""What the client scripts share (tests/test_clients.py runs them): the gateway's address and
model names from the environment, and a registry of scenarios.

A script runs the scenarios named on its command line, one after another, and writes their
outcomes as one JSON object to the file named by CLIENT_RESULTS: `{"result": ...}` with what
the scenario saw, or `{"error": ..., "traceback": ...}` when it raised, so that one failing
scenario does not hide the others. The results go to a file, not stdout, because some clients
print there themselves.

These scripts run in .venv-clients (or the test environment, for the newest `openai`): they
import nothing of chatbatch, and reach the gateway over HTTP only.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

#: The gateway's OpenAI-compatible base URL, http://127.0.0.1:PORT/v1.
BASE_URL = os.environ["CHATBATCH_BASE_URL"]
#: The tiny random model, for scenarios whose answer's content does not matter.
TINY = os.environ["CHATBATCH_TINY_MODEL"]
#: The default model (SmolLM2-135M-Instruct), for scenarios whose content matters.
DEFAULT = os.environ["CHATBATCH_DEFAULT_MODEL"]
#: The gateway runs without keys: any key is accepted, and the clients insist on one.
API_KEY = "sk-conformance"
#: Seconds a client waits for one answer.
TIMEOUT = 300.0

_SCENARIOS: dict[str, Callable[[], Any]] = {}


def scenario(function: Callable[[], Any]) -> Callable[[], Any]:
    """Register a scenario under its function's name; it returns what the test checks."""
    _SCENARIOS[function.__name__] = function
    return function


def main() -> None:
    names = sys.argv[1:] or list(_SCENARIOS)
    outcomes: dict[str, dict[str, Any]] = {}
    for name in names:
        started = time.monotonic()
        try:
            outcomes[name] = {"result": _SCENARIOS[name]()}
        except Exception as error:
            outcomes[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-6000:]}
        outcomes[name]["seconds"] = round(time.monotonic() - started, 2)
    with open(os.environ["CLIENT_RESULTS"], "w") as out:
        json.dump(outcomes, out, default=str)
