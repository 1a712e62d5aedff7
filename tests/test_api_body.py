"""The request checks every route shares (`host/api_body.py`): shape, unknown fields, strict JSON types, finite
numbers in range, required fields, and path fields through the folder policy."""
from __future__ import annotations

import math

import pytest

from lora_trainer.host.api_body import BodyField, RequestError, json_type, parse_json, read_body
from lora_trainer.host.folder_policy import FolderPolicy, PathNotAllowedError

FIELDS = {"lora": BodyField("path", required=True), "ratio": BodyField("number", 1.0, minimum=0, maximum=1),
          "rank": BodyField("int", 8, minimum=1), "fp16": BodyField("bool", False), "name": BodyField("str", "x"),
          "extra": BodyField("object")}


def test_a_good_body_gets_its_defaults():
    values = read_body({"lora": "a.safetensors", "rank": 4, "ratio": 0}, FIELDS, "tools/resize")
    assert values == {"lora": "a.safetensors", "ratio": 0.0, "rank": 4, "fp16": False, "name": "x", "extra": None}
    assert isinstance(values["ratio"], float)
    assert read_body({"lora": "a", "fp16": None}, FIELDS, "r")["fp16"] is False  # null reads as missing


@pytest.mark.parametrize("body, needles", [
    ([], ["tools/resize", "a list", "not a JSON object"]),
    ("x", ["tools/resize", 'the string "x"']),
    (5, ["tools/resize", "the number 5"]),
    ({"lora": "a", "Rank": 3}, ["'Rank'", "lora, ratio, rank"]),
    ({}, ["lora: missing", "a path"]),
    ({"lora": ""}, ["lora", 'the string ""']),
    ({"lora": 3}, ["lora", "the number 3"]),
    ({"lora": "a", "ratio": "0.5"}, ["ratio", 'the string "0.5"', "a number"]),
    ({"lora": "a", "ratio": True}, ["ratio", "the boolean true"]),
    ({"lora": "a", "ratio": math.nan}, ["ratio", "not a finite number"]),
    ({"lora": "a", "ratio": 1.5}, ["ratio", "1.5", "from 0 to 1"]),
    ({"lora": "a", "rank": 2.0}, ["rank", "whole number", "the number 2.0"]),
    ({"lora": "a", "rank": 0}, ["rank", "at least 1"]),
    ({"lora": "a", "fp16": "false"}, ["fp16", '{"fp16": false}']),
    ({"lora": "a", "fp16": 1}, ["fp16", '{"fp16": true}']),
    ({"lora": "a", "name": ["x"]}, ["name", "a list", "a string"]),
    ({"lora": "a", "extra": "x"}, ["extra", "JSON object"]),
])
def test_a_bad_body_is_refused_naming_the_field(body, needles):
    with pytest.raises(RequestError) as info:
        read_body(body, FIELDS, "tools/resize")
    assert info.value.status == 400
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_a_number_field_without_upper_limit_refuses_what_a_float_cannot_hold():
    fields = {"scale": BodyField("number")}
    assert read_body({"scale": 10**300}, fields, "r")["scale"] == 1e300
    with pytest.raises(RequestError, match="not a finite number"):
        read_body({"scale": 10**400}, fields, "r")
    assert json_type(10**400).startswith("the number 1000")


def test_path_fields_go_through_the_folder_policy(tmp_path):
    policy = FolderPolicy.build(True, [tmp_path])
    assert read_body({"lora": str(tmp_path / "a.safetensors")}, FIELDS, "r", policy)["lora"].endswith("a.safetensors")
    with pytest.raises(PathNotAllowedError) as info:
        read_body({"lora": "/elsewhere/a.safetensors"}, FIELDS, "r", policy)
    assert info.value.status == 403 and str(info.value).startswith("lora: ") and "elsewhere" not in str(info.value)


@pytest.mark.parametrize("raw", [b"{", b"\xff\xfe", b"[" * 100_000, b"1" * 5000])
def test_a_body_that_is_not_json_is_a_400(raw):
    with pytest.raises(RequestError, match="request body: not valid JSON") as info:
        parse_json(raw)
    assert info.value.status == 400


def test_an_empty_body_is_none_and_json_constants_are_read():
    assert parse_json(b"") is None and parse_json(b"  \n") is None
    assert parse_json(b'{"a": [1, true, null]}') == {"a": [1, True, None]}
    assert math.isnan(parse_json(b"NaN"))  # decoded here; every number field then refuses it
