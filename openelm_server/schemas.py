"""Request and response bodies of the HTTP API, validated by pydantic.

Requests are strict (no silent "5" → 5 or true → 1) and reject NaN/Infinity; unknown fields
are ignored, so that clients sending extra OpenAI fields keep working.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

SEED_RANGE = dict(ge=-(2**63), le=2**64 - 1)
MAX_STOP_STRINGS = 16


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
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

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


StopField = Union[Annotated[str, Field(min_length=1, max_length=256)],
                  Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(max_length=MAX_STOP_STRINGS)],
                  None]


class SamplingFields(StrictRequest):
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="extension: keep the k most likely tokens (0 = all)")
    repetition_penalty: float | None = Field(None, gt=0, le=10, description="extension: as in transformers; OpenELM's authors use 1.2")
    seed: int | None = Field(None, **SEED_RANGE)
    stop: StopField = None


class TutorialRequest(SamplingFields):
    """The body of ``POST /``: the original tutorial's ``{"prompt": ...}`` plus optional knobs."""

    prompt: ValidText
    max_length: int | None = Field(None, ge=1, description="tokens in prompt + answer (default 384, as the tutorial)")
    max_new_tokens: int | None = Field(None, ge=1, description="tokens in the answer; wins over max_length")
    do_sample: bool = False
    stream: bool = False


class StreamOptions(StrictRequest):
    include_usage: bool = False


class OpenAIRequest(SamplingFields):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: None = Field(None, description="not supported")
    user: str | None = None


class CompletionRequest(OpenAIRequest):
    prompt: Union[ValidText, Annotated[list[ValidText], Field(min_length=1, max_length=64)]]
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=1, description="only 1 is supported")
    suffix: None = Field(None, description="not supported")


class ContentPart(StrictRequest):
    type: Literal["text"]
    text: ValidText


class ChatMessage(StrictRequest):
    role: Literal["system", "user", "assistant"]
    content: Union[ValidText, list[ContentPart]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(OpenAIRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]
    max_completion_tokens: int | None = Field(None, ge=1)


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


class TutorialResponse(BaseModel):
    response: str
    status: int
    time: str


class TutorialError(BaseModel):
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


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
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
