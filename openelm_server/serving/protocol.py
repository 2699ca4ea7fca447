"""Request and response bodies of the HTTP API, validated by pydantic.

Requests are strict (no silent "5" → 5 or true → 1) and reject NaN/Infinity; unknown fields
are ignored, so that clients sending extra OpenAI fields keep working.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SEED_RANGE = dict(ge=-(2**63), le=2**64 - 1)
MAX_STOP_STRINGS = 16
MAX_PROMPTS = 64
MAX_CHOICES = 16
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS_ENTRIES = 1024


def _valid_unicode(value: str) -> str:
    """JSON may carry lone surrogates (\\ud800) that no UTF-8 text can hold; refuse them here
    rather than fail later when the answer is encoded."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains invalid Unicode (a lone surrogate)") from None
    return value


ValidText = Annotated[str, Field(max_length=1_000_000)]


class StrictRequest(BaseModel):
    # A field this server does not know is refused by name, never silently ignored: a client that
    # sends one expects it to do something.
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _strings_are_valid_unicode(cls, value):
        for text in _strings_in(value):
            _valid_unicode(text)
        return value


def _strings_in(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings_in(item)
    elif isinstance(value, BaseModel):
        for item in value.__dict__.values():
            yield from _strings_in(item)


StopField = (
    Annotated[str, Field(min_length=1, max_length=256)]
    | Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(max_length=MAX_STOP_STRINGS)]
    | None
)


class SamplingFields(StrictRequest):
    temperature: float | None = Field(None, ge=0, le=100)
    top_k: int | None = Field(None, ge=0, description="extension: keep the k most likely tokens (0 = all)")
    repetition_penalty: float | None = Field(
        None, gt=0, le=10, description="extension: as in transformers; OpenELM's authors use 1.2"
    )
    seed: int | None = Field(None, **SEED_RANGE)
    stop: StopField = None

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """``stop`` as the engine takes it, whichever form was sent."""
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class LegacyRequest(SamplingFields):
    """The body of the legacy ``POST /``: the tutorial's ``{"prompt": ...}`` plus optional knobs."""

    prompt: ValidText
    top_p: float | None = Field(None, gt=0, le=1)
    max_length: int | None = Field(None, ge=1, description="tokens in prompt + answer (default 384, as the tutorial)")
    max_new_tokens: int | None = Field(None, ge=1, description="tokens in the answer; wins over max_length")
    do_sample: bool = False
    stream: bool = False


class StreamOptions(StrictRequest):
    include_usage: bool | None = None


class OpenAIRequest(SamplingFields):
    """Fields both OpenAI routes share. Every optional field also takes an explicit null, which
    the openai SDK sends when a caller passes None."""

    model: str | None = None
    # 0 = greedy-equivalent: only the best token is kept, as OpenAI accepts it.
    top_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: (
        Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]], Field(max_length=MAX_LOGIT_BIAS_ENTRIES)] | None
    ) = None
    ignore_eos: bool | None = Field(None, description="extension (vLLM): EOS does not end the answer")
    min_tokens: int | None = Field(
        None, ge=0, description="extension (vLLM): EOS and stop strings cannot end the answer before this many tokens"
    )
    # {"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": ...}}: read by
    # the routes (structured output).
    response_format: Any = None
    # OpenAI fields this server does not implement: refused with a 400 that says so when set,
    # never silently ignored (see HARMLESS_VALUES).
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None


# The values of an unsupported field that still ask for nothing this server lacks.
HARMLESS_VALUES: dict[str, list] = {
    "tools": [None, []],
    "tool_choice": [None, "none"],
    "functions": [None, []],
    "function_call": [None, "none"],
    "audio": [None],
    "modalities": [None, ["text"]],
    "prediction": [None],
    "web_search_options": [None],
    "reasoning_effort": [None],
    "suffix": [None, ""],
}


def unsupported_fields(body: BaseModel, handled: tuple[str, ...] = ()) -> list[str]:
    """The fields of ``body`` that ask for something this server does not do; ``handled``
    names those the caller implements."""
    return [
        name
        for name, harmless in HARMLESS_VALUES.items()
        if name in type(body).model_fields and name not in handled and getattr(body, name) not in harmless
    ]


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=1_000_000)]


class CompletionRequest(OpenAIRequest):
    prompt: (
        ValidText
        | Annotated[list[ValidText], Field(min_length=1, max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    # 0 only with echo: the prompt's logprobs and nothing generated (lm-eval's loglikelihood).
    max_tokens: int | None = Field(None, ge=0)
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES, description="only equal to n is supported")
    suffix: Any = None


class ContentPart(StrictRequest):
    type: Literal["text"]
    text: ValidText


class ChatMessage(StrictRequest):
    role: Literal["system", "user", "assistant"]
    content: ValidText | list[ContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(OpenAIRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class LegacyResponse(BaseModel):
    response: str
    status: int
    time: str


class LegacyError(BaseModel):
    error: str
    status: int
    time: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "apple"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: one entry per token (prompt tokens first with echo)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    model: str


class TokenizeRequest(StrictRequest):
    """vLLM's /tokenize: a ``prompt`` (BOS added unless add_special_tokens is false), or chat
    ``messages`` rendered as /v1/chat/completions renders them."""

    model: str | None = None
    prompt: ValidText | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    return_token_strs: bool | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(StrictRequest):
    model: str | None = None
    tokens: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=1_000_000)]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str
