"""Structured output: response_format json_schema and json_object on both routes, followed by
llguidance's grammar matcher. On random weights too, a schema-constrained answer always parses
and validates."""

from __future__ import annotations

import json

import jsonschema
import pytest

MESSAGES = [{"role": "user", "content": "A person, as JSON."}]
# Bounded strings and numbers, so that even a random model's answer ends within max_tokens.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
        "member": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["name", "age", "colour", "member", "tags"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


def test_json_schema_answers_always_validate(app):
    """50 answers sampled at temperature 1, on both routes."""
    answers = []
    for seed in range(4):
        chat = app.post_ok(
            "/v1/chat/completions",
            {
                "messages": MESSAGES,
                "response_format": JSON_SCHEMA,
                "n": 8,
                "max_tokens": 120,
                "temperature": 1.0,
                "seed": seed * 100,
            },
        )
        answers += [(c["message"]["content"], c["finish_reason"]) for c in chat["choices"]]
    for seed in range(3):
        completion = app.post_ok(
            "/v1/completions",
            {
                "prompt": "Person:",
                "response_format": JSON_SCHEMA,
                "n": 6,
                "max_tokens": 120,
                "temperature": 1.0,
                "seed": seed * 100,
            },
        )
        answers += [(c["text"], c["finish_reason"]) for c in completion["choices"]]
    assert len(answers) == 50
    for text, finish_reason in answers:
        assert finish_reason == "stop", text
        jsonschema.validate(json.loads(text), PERSON)


def test_json_schema_stream_equals_the_whole_answer(app):
    body = {"messages": MESSAGES, "response_format": JSON_SCHEMA, "max_tokens": 120, "temperature": 1.0, "seed": 5}
    whole = app.post_ok("/v1/chat/completions", body)["choices"][0]
    chunks = app.stream("/v1/chat/completions", body)
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == whole["message"]["content"]
    jsonschema.validate(json.loads(streamed), PERSON)


def test_json_object_answers_are_objects(app):
    result = app.post_ok(
        "/v1/chat/completions",
        {"messages": MESSAGES, "response_format": {"type": "json_object"}, "max_tokens": 24, "temperature": 0},
    )
    text = result["choices"][0]["message"]["content"]
    assert text.startswith("{")
    if result["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)


def test_text_format_is_unconstrained(app):
    plain = app.post_ok("/v1/completions", {"prompt": "Person:", "max_tokens": 8, "temperature": 0})
    text = app.post_ok(
        "/v1/completions", {"prompt": "Person:", "max_tokens": 8, "temperature": 0, "response_format": {"type": "text"}}
    )
    assert text["choices"][0]["text"] == plain["choices"][0]["text"]


def test_json_schema_with_the_openai_sdk(app):
    async def call(client):
        return await client.chat.completions.create(
            model=app.model, messages=MESSAGES, response_format=JSON_SCHEMA, max_tokens=120, temperature=1.0, seed=9
        )

    answer = app.sdk(call).choices[0].message.content
    jsonschema.validate(json.loads(answer), PERSON)


@pytest.mark.parametrize(
    "response_format, param",
    [
        ({"type": "xml"}, "response_format.type"),
        ("json", "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema.schema"),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": "not a schema"}},
            "response_format.json_schema.schema",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strange"}}},
            "response_format.json_schema.schema",
        ),
    ],
)
def test_bad_response_formats_are_400(app, response_format, param):
    response = app.post("/v1/chat/completions", {"messages": MESSAGES, "response_format": response_format})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
