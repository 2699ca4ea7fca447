"""Tools on /v1/chat/completions: tool_choice "required" or a named function gives a call whose
arguments follow the function's schema, as OpenAI's tool_calls; "auto" is refused with why."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "description": "Time in a zone.", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


def chat(app, **body) -> dict:
    response = app.post(
        "/v1/chat/completions", {"messages": MESSAGES, "tools": TOOLS, "max_tokens": 80, "temperature": 1.0, **body}
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_named_function_call(app):
    result = chat(app, tool_choice={"type": "function", "function": {"name": "get_weather"}}, n=4, seed=1)
    for choice in result["choices"]:
        message = choice["message"]
        assert message["content"] is None and choice["finish_reason"] == "stop"
        (call,) = message["tool_calls"]
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] == "get_weather"
        jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)


def test_required_picks_one_of_the_functions(app):
    result = chat(app, tool_choice="required", n=6, seed=2)
    for choice in result["choices"]:
        assert choice["finish_reason"] == "tool_calls"
        (call,) = choice["message"]["tool_calls"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


def test_tool_choice_none_answers_in_text(app):
    result = chat(app, tool_choice="none", max_tokens=4)
    assert isinstance(result["choices"][0]["message"]["content"], str)
    assert result["choices"][0]["message"]["tool_calls"] is None


def test_tool_call_with_the_openai_sdk(app):
    async def call(client):
        return await client.chat.completions.create(
            model=app.model,
            messages=MESSAGES,
            tools=TOOLS,
            max_tokens=80,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        )

    (call,) = app.sdk(call).choices[0].message.tool_calls
    assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), TIME)


def test_auto_is_refused_with_why(app):
    async def call(client):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model=app.model, messages=MESSAGES, tools=TOOLS)
        return caught.value

    error = app.sdk(call)
    assert error.body["param"] == "tool_choice" and "not supported" in error.body["message"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required", "tools": [{"type": "function"}]}, "tools.0"),
        ({"tool_choice": "required", "tools": "x"}, "tools"),
        ({"tool_choice": "required", "tools": None}, "tools"),
        (
            {
                "tool_choice": "required",
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "x"}}}],
            },
            "tools.0.function.parameters",
        ),
        ({"tool_choice": "required", "stream": True}, "stream"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_bad_tool_requests_are_400(app, body, param):
    response = app.post("/v1/chat/completions", {"messages": MESSAGES, "tools": TOOLS, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
