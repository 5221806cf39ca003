"""How a model's chat template gets a request, and how tool calls come back out of its answer.

- Roles: `developer` goes to templates that know it, as `system` to those that do not. `name`
  and `tool_call_id` are passed along; templates that do not use them ignore them.
- Tools: a template that renders `tools` gets them, and assistant messages' `tool_calls` with
  their arguments as objects. A template that knows nothing of tools gets them the Hermes way,
  which most open chat models were tuned on: a short system note listing the tools and asking
  for `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, earlier calls written that way
  into the assistant's text, and tool results in `<tool_response>` blocks.
- With `tool_choice: "auto"` the model chooses; its calls are parsed from the Hermes format.
  An answer that `max_tokens` cut inside a `<tool_call>` block whose JSON names one of the
  tools (`{"name": "f"` written whole) ends with that call, its arguments as far as they were
  written; a block cut before its name stays text.
  A template with a tool-call format of its own other than Hermes gets `unsupported_parameter`
  for "auto" (naming the model); "required" and a named function work with every template,
  since the grammar writes the call.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from schemas.chat import ChatCompletionRequest, ChatMessage
from schemas.errors import ErrorCode, RequestError

logger = logging.getLogger(__name__)

_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
#: A call block that the end of the answer cut: its name (group 1) and, once written, the key of
#: its arguments (group 2).
_CUT_CALL = re.compile(r'<tool_call>\s*\{\s*"name"\s*:\s*"([^"\\]*)"(\s*,\s*"(?:arguments|parameters)"\s*:\s*)?')


def _arguments(text: str) -> Any:
    """A call's arguments as an object when they are JSON, as the text otherwise."""
    try:
        return json.loads(text)
    except ValueError:
        return text


class ChatFormat:
    """The chat template of one model, with what it knows.

    Args:
        tokenizer: the model's transformers tokenizer (with a chat template).
        served_name: the model's name, for messages.
    """

    def __init__(self, tokenizer: Any, served_name: str) -> None:
        self.tokenizer = tokenizer
        self.served_name = served_name
        template = str(tokenizer.chat_template or "")
        #: The template renders `tools` itself.
        self.native_tools = "tools" in template
        #: The template knows the `developer` role.
        self.knows_developer = "developer" in template
        #: Tool calls come back in the Hermes format (the template's own, or the one chatbatch
        #: teaches a template without tools).
        self.hermes = "<tool_call>" in template or not self.native_tools
        self._compiled = self._compile()

    def _compile(self) -> Any:
        """The chat template, compiled once, when rendering it directly gives what
        `apply_chat_template` gives (checked on a probe conversation); else None. Rendering
        directly skips per-call work that costs more than the rendering itself."""
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            compiled = _compile_jinja_template(self.tokenizer.chat_template)
            extra = {k: v for k, v in self.tokenizer.special_tokens_map.items() if isinstance(v, str)}
            probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                     {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}]
            direct = compiled.render(messages=probe, tools=None, documents=None, add_generation_prompt=True, **extra)
            if direct == self.tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True):
                return compiled, extra
        except Exception:  # a newer transformers, or a template that needs more: the slow path
            logger.debug("rendering the chat template directly is not possible", exc_info=True)
        return None

    def check(self, request: ChatCompletionRequest) -> RequestError | None:
        """A request this model cannot take as asked (checked before it is rendered)."""
        if request.tools and request.effective_tool_choice == "auto" and not self.hermes:
            return RequestError(
                ErrorCode.unsupported_parameter,
                f"tool_choice 'auto': the chat template of {self.served_name!r} writes tool calls in a format "
                "chatbatch does not parse (it parses Hermes' <tool_call> blocks): use tool_choice 'required' or "
                "a named function, which chatbatch enforces with a grammar",
                param="tool_choice",
            )
        return None

    def render(self, request: ChatCompletionRequest) -> str:
        """The prompt text of a request."""
        messages, tools = self.messages(request)
        if self._compiled is not None:
            compiled, extra = self._compiled
            return str(compiled.render(messages=messages, tools=tools, documents=None, add_generation_prompt=True, **extra))
        return str(self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True))

    def messages(self, request: ChatCompletionRequest) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """The messages and tools as the template takes them."""
        messages = [self._message(message) for message in request.messages]
        offered = request.tools if request.tools and request.effective_tool_choice != "none" else None
        tools = [tool.model_dump(exclude_none=True) for tool in offered] if offered else None
        if tools is None or self.native_tools:
            return messages, tools
        return self._teach_tools(messages, tools, calls=request.effective_tool_choice == "auto"), None

    def _message(self, message: ChatMessage) -> dict[str, Any]:
        role = message.role
        if role == "developer" and not self.knows_developer:
            role = "system"
        rendered: dict[str, Any] = {"role": role, "content": message.text()}
        if message.name:
            rendered["name"] = message.name
        if message.tool_calls:
            if self.native_tools:
                rendered["tool_calls"] = [
                    {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": _arguments(call.function.arguments)}}
                    for call in message.tool_calls
                ]
            else:
                calls = "\n".join(
                    "<tool_call>" + json.dumps({"name": call.function.name, "arguments": _arguments(call.function.arguments)}) + "</tool_call>"
                    for call in message.tool_calls
                )
                rendered["content"] = f"{rendered['content']}\n{calls}" if rendered["content"] else calls
        if message.role == "tool":
            if self.native_tools:
                rendered["tool_call_id"] = message.tool_call_id
            else:
                rendered["content"] = f"<tool_response>\n{rendered['content']}\n</tool_response>"
        return rendered

    @staticmethod
    def _teach_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]], *, calls: bool) -> list[dict[str, Any]]:
        """The Hermes system note, added to the first system message (or as one). For a forced
        call (`calls` False) it names the functions only: the grammar writes the call."""
        if calls:
            note = (
                "You may call these functions: <tools>" + json.dumps([tool["function"] for tool in tools], separators=(",", ":"))
                + '</tools> To call one, answer with <tool_call>{"name": ..., "arguments": {...}}</tool_call>.'
            )
        else:
            described = [f"{tool['function']['name']}" + (f" ({tool['function']['description']})" if tool["function"].get("description") else "")
                         for tool in tools]
            note = "Answer with a call of: " + "; ".join(described) + "."
        if messages and messages[0]["role"] == "system":
            first = {**messages[0], "content": f"{messages[0]['content']}\n\n{note}" if messages[0]["content"] else note}
            return [first, *messages[1:]]
        return [{"role": "system", "content": note}, *messages]


def written_arguments(text: str) -> str:
    """A cut call's arguments: the JSON value that begins `text` when it is complete (as
    compact JSON), else `text` as written."""
    try:
        value, _ = json.JSONDecoder().raw_decode(text.lstrip())
    except ValueError:
        return text
    return json.dumps(value, separators=(", ", ": "), ensure_ascii=False)


def parse_hermes(text: str, names: set[str] | None = None, *, cut: bool = False) -> tuple[str | None, list[tuple[str, str]]]:
    """(the text left around them, or None when nothing is, [(name, arguments JSON)]) of the
    `<tool_call>` blocks of an answer; blocks that are not a JSON call of one of `names` (any
    name, when None) stay text. `cut`: `max_tokens` ended the answer, and a last block left open
    after its name is a call whose arguments are the text written so far."""
    calls: list[tuple[str, str]] = []
    kept: list[str] = []
    last = 0
    for match in _TOOL_CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
            name = call["name"]
            arguments = call.get("arguments", call.get("parameters", {}))
        except (ValueError, KeyError, TypeError):
            continue
        if not isinstance(name, str) or (names is not None and name not in names):
            continue
        kept.append(text[last : match.start()])
        last = match.end()
        calls.append((name, arguments if isinstance(arguments, str) else json.dumps(arguments, separators=(", ", ": "), ensure_ascii=False)))
    tail = text[last:]
    opened = _CUT_CALL.search(tail, tail.rfind("</tool_call>") + 1) if cut else None
    if opened is not None and (names is None or opened.group(1) in names):
        calls.append((opened.group(1), written_arguments(tail[opened.end():]) if opened.group(2) else ""))
        tail = tail[: opened.start()]
    kept.append(tail)
    rest = "".join(kept).strip()
    return (rest or None) if calls else text, calls
