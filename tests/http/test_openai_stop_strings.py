"""Stop strings through the OpenAI API: cut where they start, across tokens, streamed or not."""

from __future__ import annotations

import pytest
from openai_helpers import (
    CHINESE,
    ENGLISH,
    REPLACEMENT,
    chat,
    collect_chat_stream,
    collect_completion_stream,
    complete,
    user,
)


def stop_in_the_middle(pieces: list[str]) -> str:
    """A stop string that spans two streamed pieces (so two tokens) around the middle of the
    text, and whose first occurrence is there."""
    text = "".join(pieces)
    boundaries = []
    position = 0
    for piece in pieces[:-1]:
        position += len(piece)
        boundaries.append(position)
    boundaries.sort(key=lambda b: abs(b - len(text) // 2))
    for boundary in boundaries:
        for before, after in ((2, 2), (1, 2), (2, 1), (1, 1)):
            start, end = boundary - before, boundary + after
            if start <= 0 or end > len(text):
                continue
            stop = text[start:end]
            if stop.strip() and REPLACEMENT not in stop and text.find(stop) == start:
                return stop
    raise AssertionError(f"no usable stop string in {pieces!r}")


@pytest.mark.parametrize("prompt", [ENGLISH, CHINESE])
def test_stop_string_spanning_tokens(client, model_name, prompt):
    first = collect_completion_stream(complete(client, model_name, prompt, max_tokens=16, stream=True))
    text = first.text()
    stop = stop_in_the_middle(first.pieces[0])
    expected = text[: text.find(stop)]

    result = complete(client, model_name, prompt, max_tokens=16, stop=[stop])
    assert result.choices[0].text == expected
    assert result.choices[0].finish_reason == "stop"
    assert result.usage.completion_tokens < 16

    streamed = collect_completion_stream(
        complete(
            client, model_name, prompt, max_tokens=16, stop=stop, stream=True, stream_options={"include_usage": True}
        )
    )
    assert streamed.text() == expected
    assert all(stop not in piece for piece in streamed.pieces[0])
    assert streamed.finish == {0: "stop"}
    assert streamed.usage.completion_tokens == result.usage.completion_tokens


def test_earliest_of_several_stop_strings_wins(client, model_name):
    text = complete(client, model_name, ENGLISH, max_tokens=16).choices[0].text
    first, later = text[3:6], text[9:12]
    result = complete(client, model_name, ENGLISH, max_tokens=16, stop=[later, "\x01never", first])
    assert result.choices[0].text == text[: min(text.find(first), text.find(later))]
    assert result.choices[0].finish_reason == "stop"


def test_held_back_partial_stop_is_released_at_the_end(client, model_name):
    """The end of the text is the start of a stop string that never completes: it is held
    back while it might, and released when the generation ends."""
    text = complete(client, model_name, ENGLISH, max_tokens=12).choices[0].text
    stop = text[-3:] + "\x01\x02"
    result = complete(client, model_name, ENGLISH, max_tokens=12, stop=[stop])
    assert result.choices[0].text == text
    assert result.choices[0].finish_reason == "length"
    streamed = collect_completion_stream(complete(client, model_name, ENGLISH, max_tokens=12, stop=[stop], stream=True))
    assert streamed.text() == text and streamed.finish == {0: "length"}


def test_stop_string_in_the_echoed_prompt_does_not_stop(client, model_name):
    text = complete(client, model_name, ENGLISH, max_tokens=8).choices[0].text
    assert "upon" not in text
    result = complete(client, model_name, ENGLISH, max_tokens=8, echo=True, stop=["upon"])
    assert result.choices[0].text == ENGLISH + text
    assert result.choices[0].finish_reason == "length"


def test_chat_stop_string(client, model_name):
    first = collect_chat_stream(chat(client, model_name, user("Hi"), max_tokens=16, stream=True))
    text = first.text()
    stop = stop_in_the_middle(first.pieces[0])
    result = chat(client, model_name, user("Hi"), max_tokens=16, stop=stop)
    assert result.choices[0].message.content == text[: text.find(stop)]
    assert result.choices[0].finish_reason == "stop"
    streamed = collect_chat_stream(chat(client, model_name, user("Hi"), max_tokens=16, stop=stop, stream=True))
    assert streamed.text() == text[: text.find(stop)] and streamed.finish == {0: "stop"}
