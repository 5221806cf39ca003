"""instructor against the gateway, as its docs show it: a response model in JSON_SCHEMA and
TOOLS modes, `create_partial` (a stream of partial objects) and `create_iterable` (several
objects from one answer). The models are plain pydantic models, as users write them: their
schemas do not forbid other properties, so the answer must hold to the declared ones."""

from __future__ import annotations

from typing import Any

import instructor
import openai
from pydantic import BaseModel, Field
from scenarios import API_KEY, BASE_URL, DEFAULT, TIMEOUT, TINY, main, scenario


class UserInfo(BaseModel):
    """A user's name and age."""

    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)


class User(BaseModel):
    name: str
    age: int


def client(mode: instructor.Mode = instructor.Mode.TOOLS) -> Any:
    return instructor.from_openai(openai.OpenAI(base_url=BASE_URL, api_key=API_KEY, max_retries=0, timeout=TIMEOUT), mode=mode)


MESSAGES: Any = [{"role": "user", "content": "John Doe is 30 years old."}]


def _extract(mode: instructor.Mode) -> dict[str, Any]:
    user, completion = client(mode).chat.completions.create_with_completion(
        model=TINY, response_model=UserInfo, messages=MESSAGES, max_tokens=60, temperature=0, max_retries=0,
    )
    return {"user": user.model_dump(), "finish_reason": completion.choices[0].finish_reason}


@scenario
def json_schema() -> dict[str, Any]:
    return _extract(instructor.Mode.JSON_SCHEMA)


@scenario
def tools() -> dict[str, Any]:
    return _extract(instructor.Mode.TOOLS)


@scenario
def create_partial() -> dict[str, Any]:
    partials = client(instructor.Mode.JSON_SCHEMA).chat.completions.create_partial(
        model=TINY, response_model=UserInfo, messages=MESSAGES, max_tokens=60, temperature=0, max_retries=0,
    )
    return {"partials": [partial.model_dump() for partial in partials]}


@scenario
def create_iterable() -> dict[str, Any]:
    """instructor's own example, on the default model (the objects' content matters)."""
    users = client().chat.completions.create_iterable(
        model=DEFAULT, response_model=User, max_tokens=60, temperature=0, max_retries=0,
        messages=[{"role": "user", "content": "Consider this data: Jason is 10 and John is 30. Correctly segment it into entities. Make sure the JSON is correct"}],
    )
    return {"users": [user.model_dump() for user in users]}


if __name__ == "__main__":
    main()
