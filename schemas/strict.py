"""OpenAI's strict mode for JSON Schemas: `strict: true` in `response_format.json_schema` or in a
tool's `function` asks that the schema keep to the subset OpenAI's Structured Outputs accept
(platform.openai.com, "Structured Outputs", supported schemas), and a schema outside it is
refused with `invalid_request` naming the rule and the schema's path, as OpenAI refuses it with
a 400. Without `strict` any schema the grammar library compiles is accepted.

The rules:
- the root is an object schema (`"type": "object"`), not `anyOf`;
- every object schema has `additionalProperties: false` and lists every property in `required`
  (an optional field is a required one whose type allows null);
- only these keywords: `type`, `properties`, `required`, `additionalProperties`, `items`,
  `enum`, `const`, `anyOf`, `$ref`, `$defs` / `definitions`; for strings `pattern` and
  `format` (date-time, time, date, duration, email, hostname, ipv4, ipv6, uuid); for numbers
  `multipleOf`, `maximum`, `exclusiveMaximum`, `minimum`, `exclusiveMinimum`; for arrays
  `minItems`, `maxItems`; and the annotations that constrain nothing (`title`,
  `description`, `default`, `examples`, `$comment`, `$schema`, `$id`, `deprecated`,
  `readOnly`, `writeOnly`);
- at most 10 levels of nested objects (counted as written: a `$ref` is not followed, so
  recursive schemas are allowed) and 5,000 properties in all;
- at most 1,000 enum values in all; at most 120,000 characters of property names, definition
  names and string enum and const values in all; and an enum of more than 250 strings at most
  15,000 characters.

Pure Python: schemas/ imports pydantic only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn

from schemas.errors import ErrorCode, RequestError

#: Keywords strict mode accepts.
STRUCTURE = frozenset({"type", "properties", "required", "additionalProperties", "items", "enum", "const", "anyOf", "$ref", "$defs", "definitions"})
STRING_KEYWORDS = frozenset({"pattern", "format"})
NUMBER_KEYWORDS = frozenset({"multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum"})
ARRAY_KEYWORDS = frozenset({"minItems", "maxItems"})
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "$schema", "$id", "deprecated", "readOnly", "writeOnly"})
KEYWORDS = STRUCTURE | STRING_KEYWORDS | NUMBER_KEYWORDS | ARRAY_KEYWORDS | ANNOTATIONS
#: String formats strict mode accepts.
FORMATS = ("date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid")
TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})
#: OpenAI's size limits.
MAX_DEPTH = 10
MAX_PROPERTIES = 5_000
MAX_ENUM_VALUES = 1_000
MAX_STRING_CHARS = 120_000
#: An enum of more than LONG_ENUM strings has at most LONG_ENUM_CHARS characters of them.
LONG_ENUM = 250
LONG_ENUM_CHARS = 15_000


@dataclass
class _Totals:
    """What the size limits count, over the whole schema."""

    properties: int = 0
    enum_values: int = 0
    chars: int = 0


def check_strict(schema: dict[str, Any] | None, where: str) -> None:
    """Refuse a schema that strict mode does not accept.

    Args:
        schema: the schema (None: the field is absent, which strict mode allows).
        where: the field it comes from, with the request's prefix, e.g.
            ``"body.response_format.json_schema.schema"``.

    Raises:
        RequestError: invalid_request naming the rule, with `param` the path in the schema.
    """
    if schema is None:
        return
    if not isinstance(schema, dict) or "anyOf" in schema or _types(schema) != ["object"]:
        _refuse(where, 'the root must be an object schema ("type": "object"), not anyOf or another type, in strict mode: '
                       "wrap the value in an object's property")
    totals = _Totals()
    _check(schema, where, 0, totals)
    if totals.properties > MAX_PROPERTIES:
        _refuse(where, f"{totals.properties} properties in all; strict mode allows at most {MAX_PROPERTIES}")
    if totals.enum_values > MAX_ENUM_VALUES:
        _refuse(where, f"{totals.enum_values} enum values in all; strict mode allows at most {MAX_ENUM_VALUES}")
    if totals.chars > MAX_STRING_CHARS:
        _refuse(where, f"{totals.chars} characters of property names, definition names, enum and const values in all; "
                       f"strict mode allows at most {MAX_STRING_CHARS}")


def _refuse(where: str, rule: str) -> NoReturn:
    raise RequestError(ErrorCode.invalid_request, f"'{where}': {rule}", param=where)


def _types(schema: dict[str, Any]) -> list[Any]:
    kind = schema.get("type")
    return kind if isinstance(kind, list) else [kind] if kind is not None else []


def _check(schema: Any, where: str, depth: int, totals: _Totals) -> None:
    """Check one schema and those inside it; `depth` counts the objects around it."""
    if not isinstance(schema, dict):
        _refuse(where, "must be a JSON Schema object in strict mode")
    for key in schema:
        if key not in KEYWORDS:
            _refuse(where, f"'{key}' is not supported in strict mode (supported: {', '.join(sorted(KEYWORDS - ANNOTATIONS))})")
    _check_values(schema, where, totals)
    if "object" in _types(schema) or "properties" in schema:
        depth += 1
        if depth > MAX_DEPTH:
            _refuse(where, f"objects nest {depth} levels deep here; strict mode allows at most {MAX_DEPTH}")
        _check_object(schema, where, depth, totals)
    if isinstance(schema.get("items"), list):
        _refuse(f"{where}.items", "must be one schema in strict mode (a list of schemas is a tuple, which it does not accept)")
    if "items" in schema:
        _check(schema["items"], f"{where}.items", depth, totals)
    if "anyOf" in schema:
        if not isinstance(schema["anyOf"], list):
            _refuse(f"{where}.anyOf", "must be a list of schemas")
        for i, part in enumerate(schema["anyOf"]):
            _check(part, f"{where}.anyOf[{i}]", depth, totals)
    for key in ("$defs", "definitions"):
        for name, part in _mapping(schema, key, where).items():
            totals.chars += len(str(name))
            _check(part, f"{where}.{key}.{name}", depth, totals)


def _mapping(schema: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    found = schema.get(key, {})
    if not isinstance(found, dict):
        _refuse(f"{where}.{key}", "must be an object of schemas")
    return found


def _check_values(schema: dict[str, Any], where: str, totals: _Totals) -> None:
    """The keywords' values: types, formats, enum and const sizes."""
    for kind in _types(schema):
        if kind not in TYPES:
            _refuse(f"{where}.type", f"{kind!r} is not a JSON Schema type (types: {', '.join(sorted(TYPES))})")
    if "format" in schema and schema["format"] not in FORMATS:
        _refuse(f"{where}.format", f"format {schema['format']!r} is not supported in strict mode (supported: {', '.join(FORMATS)})")
    if "enum" in schema:
        values = schema["enum"] if isinstance(schema["enum"], list) else []
        strings = sum(len(value) for value in values if isinstance(value, str))
        totals.enum_values += len(values)
        totals.chars += strings
        if len(values) > LONG_ENUM and strings > LONG_ENUM_CHARS:
            _refuse(f"{where}.enum", f"{len(values)} values of {strings} characters; strict mode allows at most "
                                     f"{LONG_ENUM_CHARS} characters in an enum of more than {LONG_ENUM} strings")
    if isinstance(schema.get("const"), str):
        totals.chars += len(schema["const"])


def _check_object(schema: dict[str, Any], where: str, depth: int, totals: _Totals) -> None:
    """An object schema: closed, every property required, each property's schema."""
    if schema.get("additionalProperties") is not False:
        _refuse(f"{where}.additionalProperties", "must be false in every object in strict mode: "
                                                 'add "additionalProperties": false')
    properties = _mapping(schema, "properties", where)
    required = schema.get("required", [])
    if not isinstance(required, list):
        _refuse(f"{where}.required", "must be a list of property names")
    for name in required:
        if name not in properties:
            _refuse(f"{where}.required", f"lists {name!r}, which is not in 'properties'")
    for name, part in properties.items():
        if name not in required:
            _refuse(f"{where}.properties.{name}", f"'required' must list every property in strict mode: add {name!r} to "
                                                  "'required' (to let it be empty, allow null: \"type\": [..., \"null\"])")
        totals.properties += 1
        totals.chars += len(str(name))
        _check(part, f"{where}.properties.{name}", depth, totals)
