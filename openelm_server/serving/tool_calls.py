"""Tools on /v1/chat/completions: a forced call, its arguments constrained to the function's
JSON schema and returned as OpenAI's ``tool_calls``.

OpenELM was not trained to choose between answering and calling a tool, so ``tool_choice``
"auto" (OpenAI's default when tools are given) is refused with a 400 that says so; "required"
(one of the functions, the model picks which) and a named function are followed exactly.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from openelm_server.engine.structured import OutputConstraint
from openelm_server.serving.errors import ApiError

EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolCallPlan:
    constraint: OutputConstraint
    # Told to the model in a system message: the functions it calls and how to answer.
    instructions: str
    # The function tool_choice names; None when the answer names it ({"name", "arguments"}).
    function: str | None


def _functions(tools) -> dict[str, dict]:
    if not isinstance(tools, list) or not tools:
        raise ApiError(400, 'tools must be a non-empty list of {"type": "function", "function": {...}}', param="tools")
    functions: dict[str, dict] = {}
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise ApiError(
                400,
                'each tool must be {"type": "function", "function": {"name": ..., "parameters": {...}}}',
                param=f"tools.{index}",
            )
        parameters = function.get("parameters", EMPTY_PARAMETERS)
        problem = (
            OutputConstraint(json.dumps(parameters)).problem() if isinstance(parameters, dict) else "not an object"
        )
        if problem:
            raise ApiError(
                400,
                f"tools.{index}.function.parameters is not a JSON schema this server can follow: {problem}",
                param=f"tools.{index}.function.parameters",
            )
        functions[name] = {"description": function.get("description", ""), "parameters": parameters}
    return functions


def plan_tool_call(tools, tool_choice) -> ToolCallPlan | None:
    """What the answer must be, from the request's tools and tool_choice; None for a plain answer."""
    if tool_choice == "none" or (tool_choice is None and tools in (None, [])):
        return None
    functions = _functions(tools)
    if tool_choice is None or tool_choice == "auto":
        raise ApiError(
            400,
            'tool_choice "auto" (the default when tools are given) is not supported: OpenELM was '
            "not trained to choose between answering and calling a tool; pass tool_choice "
            '"required" or {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    if tool_choice == "required":
        schema = {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"name": {"const": name}, "arguments": spec["parameters"]},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
                for name, spec in functions.items()
            ]
        }
        listing = "\n".join(_describe(name, spec) for name, spec in functions.items())
        return ToolCallPlan(
            OutputConstraint(json.dumps(schema)),
            f"Call one of these functions:\n{listing}\n"
            'Answer with JSON only: {"name": <function>, "arguments": {...}}.',
            None,
        )
    named = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if named not in functions:
        raise ApiError(
            400,
            'tool_choice must be "none", "required" or {"type": "function", "function": {"name": <one of tools>}}',
            param="tool_choice",
        )
    return ToolCallPlan(
        OutputConstraint(json.dumps(functions[named]["parameters"])),
        f"Call this function:\n{_describe(named, functions[named])}\nAnswer with its arguments as JSON only.",
        named,
    )


def _describe(name: str, spec: dict) -> str:
    return f"- {name}: {spec['description']} Arguments (JSON schema): {json.dumps(spec['parameters'])}"


def tool_calls(plan: ToolCallPlan, text: str) -> list[dict] | None:
    """The answer as OpenAI's tool_calls; None when it is not whole JSON (cut by max_tokens)."""
    try:
        answer = json.loads(text)
    except json.JSONDecodeError:
        return None
    name, arguments = (plan.function, answer) if plan.function else (answer["name"], answer["arguments"])
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
        }
    ]
