"""langchain-openai's ChatOpenAI against the gateway, as LangChain's docs show it: invoke,
stream, batch, `with_structured_output` in its three methods, and `bind_tools` (a call, then
its result sent back; and a call that max_tokens cuts)."""

from __future__ import annotations

from typing import Any, Literal

from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field
from scenarios import API_KEY, BASE_URL, DEFAULT, TIMEOUT, TINY, main, scenario


class City(BaseModel):
    """A city and its population."""

    # A pattern, not maxLength: LangChain's json_schema method sends strict mode, whose
    # supported keywords (OpenAI's) include pattern and not maxLength. Either keeps the random
    # model's name short enough to end within max_tokens.
    name: str = Field(pattern=r"^[A-Za-z]{1,10}$")
    population: int = Field(ge=0, le=100_000_000)


class GetWeather(BaseModel):
    """The weather in a city."""

    city: Literal["Paris", "Rome", "Oslo"]


def llm(model: str = TINY, **options: Any) -> ChatOpenAI:
    settings: dict[str, Any] = {"max_tokens": 8, "temperature": 0, **options}
    return ChatOpenAI(model=model, base_url=BASE_URL, api_key=API_KEY, max_retries=0, timeout=TIMEOUT, **settings)  # type: ignore[arg-type]


def _message(message: Any) -> dict[str, Any]:
    return {
        "content": message.content, "metadata": message.response_metadata, "usage": message.usage_metadata,
        "tool_calls": message.tool_calls, "invalid_tool_calls": message.invalid_tool_calls,
    }


@scenario
def invoke() -> dict[str, Any]:
    return _message(llm().invoke("hello"))


@scenario
def stream() -> dict[str, Any]:
    """A stream adds up to the answer `invoke` gives (greedy), with the usage at its end."""
    model = llm(stream_usage=True)
    chunks = list(model.stream("hello"))
    whole: Any = chunks[0]
    for chunk in chunks[1:]:
        whole = whole + chunk
    return {"chunks": len(chunks), "streamed": _message(whole), "invoked": model.invoke("hello").content}


@scenario
def batch() -> dict[str, Any]:
    answers = llm().batch(["one", "two", "three"])
    return {"answers": [_message(answer) for answer in answers]}


def _structured(method: str, model: str = TINY, **prompting: Any) -> dict[str, Any]:
    structured = llm(model, max_tokens=80).with_structured_output(City, method=method, include_raw=True)  # type: ignore[arg-type]
    out: Any = structured.invoke(prompting.get("messages", "Paris has 2 million people."))
    parsed = out["parsed"]
    return {"parsed": parsed.model_dump() if parsed else None, "error": repr(out["parsing_error"]) if out["parsing_error"] else None,
            "raw": _message(out["raw"])}


@scenario
def structured_json_schema() -> dict[str, Any]:
    return _structured("json_schema")


@scenario
def structured_function_calling() -> dict[str, Any]:
    return _structured("function_calling")


@scenario
def structured_json_mode() -> dict[str, Any]:
    """JSON mode constrains the answer to a JSON object and leaves its keys to the prompt: on
    the default model, which reads the prompt."""
    return _structured("json_mode", DEFAULT, messages=[
        ("system", 'Answer with a JSON object with the keys "name" (a string) and "population" (an integer).'),
        ("human", "Paris has 2000000 people."),
    ])


@scenario
def bind_tools() -> dict[str, Any]:
    """A forced call, then the conversation with the call and its result sent back."""
    tooled = llm(max_tokens=40).bind_tools([GetWeather], tool_choice="GetWeather")
    question = HumanMessage("What is the weather in Oslo?")
    called: AIMessage = tooled.invoke([question])  # type: ignore[assignment]
    results = [ToolMessage("sunny", tool_call_id=call["id"]) for call in called.tool_calls]
    answer = llm().invoke([question, called, *results])
    return {"called": _message(called), "answer": _message(answer)}


@scenario
def bind_tools_cut() -> dict[str, Any]:
    """A forced call that max_tokens cuts is still a call (with the arguments as far as they
    went), never the grammar's text as the answer."""
    return _message(llm(max_tokens=4).bind_tools([GetWeather], tool_choice="GetWeather").invoke("What is the weather in Oslo?"))


if __name__ == "__main__":
    main()
