"""Checking of JSON request bodies for the extension's HTTP routes (training now, LoRA tools later).

A route declares its fields as `BodyField`s and calls `read_body`: the body must be a JSON object, unknown fields
are refused, every value must have its declared JSON type (booleans are JSON `true`/`false`, never the strings
"false" or "0"; numbers are finite), and path fields go through the folder policy. Every refusal is a
`RequestError` whose message reads "<field>: <what is wrong>. <how to fix>" and whose `status` is the HTTP code.
Nothing here imports the WebUI or FastAPI.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from lora_trainer.errors import LoraTrainerError

KINDS = ("bool", "int", "number", "str", "path", "object", "list")
_KIND_TEXT = {"bool": "true or false", "int": "a whole number",
              "number": "a number", "str": "a string", "path": "a path (a string)",
              "object": "a JSON object like {\"key\": value}", "list": "a JSON list like [1, 2]"}


class RequestError(LoraTrainerError, ValueError):
    """A request a route refuses; the message names the field and the fix.

    Args:
        message (str): "<field>: <what is wrong>. <how to fix>".
        status (int, optional): the HTTP status code, defaults to 400.
    """

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class BodyField:
    """One field a route accepts.

    Attributes:
        kind (str): one of `KINDS`: "bool", "int", "number", "str", "path" (a string the folder policy checks),
            "object".
        default (Any): the value when the field is missing or null.
        minimum (float, optional): smallest allowed number (int and number kinds).
        maximum (float, optional): largest allowed number (int and number kinds).
        required (bool): refuse a body without it.
        items (str, optional): the kind of every element of a "list" field (checked with the same range).
    """

    kind: str
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    required: bool = False
    items: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS or (self.items is not None and self.items not in KINDS):
            raise ValueError(f"BodyField.kind = {self.kind!r}: unknown. Use one of {', '.join(KINDS)}.")


def json_type(value: Any) -> str:
    """How a JSON value's type reads in a message ("the string \"false\"", "a list", "null").

    Args:
        value (Any): a value decoded from JSON.

    Returns:
        str: its description.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {json.dumps(value)}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {json.dumps(shown)}"
    if isinstance(value, (int, float)):
        finite = not isinstance(value, float) or math.isfinite(value)
        return f"the number {value!r}" if finite else f"the non-finite number {value!r}"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def parse_json(raw: bytes) -> Any:
    """The value of a request body; an empty body is None.

    Args:
        raw (bytes): the body as received.

    Returns:
        Any: the decoded JSON value.

    Raises:
        RequestError: the body is not UTF-8 JSON.
    """
    if not raw.strip():
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as error:  # bad JSON or UTF-8, an int of 4300+ digits, deep nesting
        raise RequestError(f"request body: not valid JSON ({error}). Send a JSON object such as "
                           "{\"save\": true} with Content-Type: application/json.") from error


def read_body(body: Any, fields: Mapping[str, BodyField], route: str, policy=None) -> dict[str, Any]:
    """Check a decoded body against a route's fields.

    Args:
        body (Any): the decoded JSON body (None: empty body, read as `{}`).
        fields (Mapping[str, BodyField]): the fields the route accepts.
        route (str): the route's name for messages, e.g. "train/stop".
        policy (FolderPolicy, optional): checks "path" fields, defaults to None (no folder rule).

    Returns:
        dict[str, Any]: every declared field, missing or null ones at their default.

    Raises:
        RequestError: 400 for a wrong shape, type or range; 403 from the policy for a path outside its folders.
    """
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise RequestError(f"{route}: the body is {json_type(body)}, not a JSON object. Send an object with the "
                           f"fields {', '.join(fields)}.")
    unknown = sorted(str(key) for key in body if key not in fields)
    if unknown:
        raise RequestError(f"{route}: unknown field {', '.join(map(repr, unknown[:5]))}. The fields are: "
                           f"{', '.join(fields)}.")
    values = {}
    for name, field in fields.items():
        value = body.get(name)
        if value is None:
            if field.required:
                raise RequestError(f"{name}: missing. Send {name} as {_KIND_TEXT[field.kind]}.")
            values[name] = field.default
            continue
        values[name] = check_value(name, value, field)
        if field.kind == "path" and policy is not None:
            policy.check(name, values[name])
    return values


def check_value(name: str, value: Any, field: BodyField) -> Any:
    """One value checked against its field's kind and range.

    Args:
        name (str): the field's name, for the message.
        value (Any): a decoded JSON value (not None).
        field (BodyField): what it must be.

    Returns:
        Any: the value (ints of the "number" kind as float).

    Raises:
        RequestError: the value has another type, is not finite, or is out of range.
    """
    expected = _KIND_TEXT[field.kind]
    ok = {"bool": isinstance(value, bool),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "number": isinstance(value, (int, float)) and not isinstance(value, bool),
          "str": isinstance(value, str), "path": isinstance(value, str) and value.strip() != "",
          "object": isinstance(value, dict), "list": isinstance(value, list)}[field.kind]
    if not ok:
        raise RequestError(f"{name}: expected {expected}, got {json_type(value)}. {_fix(name, value, field)}")
    if field.kind == "list" and field.items is not None:
        item = BodyField(field.items, minimum=field.minimum, maximum=field.maximum)
        return [check_value(f"{name}[{i}]", element, item) for i, element in enumerate(value)]
    if field.kind in ("int", "number"):
        return _in_range(name, value, field)
    return value


def _fix(name: str, value: Any, field: BodyField) -> str:
    if field.kind != "bool":
        return f"Send {name} as {_KIND_TEXT[field.kind]}."
    meant = {"true": "true", "1": "true", "false": "false", "0": "false"}.get(str(value).strip().lower())
    if meant is None:
        return f'Send {{"{name}": true}} or {{"{name}": false}}.'
    return f'Send {{"{name}": {meant}}} (JSON true/false, without quotes).'


def _in_range(name: str, value: int | float, field: BodyField) -> int | float:
    number = value
    if field.kind == "number":
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range
            number = math.inf
    if isinstance(number, float) and not math.isfinite(number):
        raise RequestError(f"{name}: {json_type(value)} is not a finite number. Send a plain number.")
    low = field.minimum if field.minimum is not None else -math.inf
    high = field.maximum if field.maximum is not None else math.inf
    if not low <= number <= high:
        if field.minimum is not None and field.maximum is not None:
            allowed = f"from {field.minimum:g} to {field.maximum:g}"
        else:
            allowed = f"of at least {low:g}" if number < low else f"of at most {high:g}"
        raise RequestError(f"{name}: {value!r} is out of range. Use a value {allowed}.")
    return number


__all__ = ["KINDS", "BodyField", "RequestError", "check_value", "json_type", "parse_json", "read_body"]
