"""/v1/chat/completions with the official openai SDK: fields, the Zephyr template OpenELM was
tuned with, messages and content parts, streams, and --chat-template."""

from __future__ import annotations

import time

import pytest
from in_process import ServerThread
from openai import OpenAI
from openai_helpers import CHINESE, ZEPHYR_HI, assert_clean_pieces, chat, collect_chat_stream, complete, n_tokens, user


def test_chat_fields_usage_and_zephyr_template(client, model_name, tokenizer):
    result = chat(client, model_name, user("Hi"), max_tokens=10)
    assert result.id.startswith("chatcmpl-")
    assert result.object == "chat.completion"
    assert result.model == model_name
    assert abs(result.created - time.time()) < 5
    (choice,) = result.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert result.usage.prompt_tokens == n_tokens(tokenizer, ZEPHYR_HI)
    assert result.usage.completion_tokens == 10
    assert result.usage.total_tokens == result.usage.prompt_tokens + 10
    # The template's </s> is the EOS token, not the text "</s>".
    assert tokenizer(ZEPHYR_HI).input_ids.count(tokenizer.eos_token_id) == 1
    # Exactly that prompt: the chat answer is the completion of the rendered text.
    rendered = complete(client, model_name, ZEPHYR_HI, max_tokens=10)
    assert rendered.choices[0].text == choice.message.content
    assert rendered.usage.prompt_tokens == result.usage.prompt_tokens


def test_chat_system_and_multi_turn_messages(client, model_name, tokenizer):
    messages = [
        {"role": "system", "content": "You are brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "你好"},
    ]
    rendered = (
        "<|system|>\nYou are brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n"
        "<|user|>\n你好</s>\n<|assistant|>\n"
    )
    result = chat(client, model_name, messages, max_tokens=8)
    assert result.usage.prompt_tokens == n_tokens(tokenizer, rendered)
    assert result.choices[0].message.content == complete(client, model_name, rendered, max_tokens=8).choices[0].text


def test_chat_content_parts_and_max_completion_tokens(client, model_name, tokenizer):
    parts = [{"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]}]
    result = client.chat.completions.create(model=model_name, messages=parts, temperature=0, max_completion_tokens=7)
    assert result.usage.prompt_tokens == n_tokens(tokenizer, ZEPHYR_HI)
    assert result.usage.completion_tokens == 7
    assert (
        result.choices[0].message.content
        == chat(client, model_name, user("Hi"), max_tokens=7).choices[0].message.content
    )


@pytest.mark.parametrize("content", ["Hi", CHINESE, "绍兴 😀"])
def test_chat_stream_equals_non_stream(client, model_name, content):
    whole = chat(client, model_name, user(content), max_tokens=12)
    streamed = collect_chat_stream(
        chat(client, model_name, user(content), max_tokens=12, stream=True, stream_options={"include_usage": True})
    )
    text = whole.choices[0].message.content
    assert streamed.text() == text
    assert_clean_pieces(streamed.pieces[0], text)
    assert streamed.finish == {0: "length"}
    assert streamed.usage.model_dump() == whole.usage.model_dump()
    assert streamed.chunks[0].choices[0].delta.role == "assistant"
    (stream_id,) = streamed.ids
    assert stream_id.startswith("chatcmpl-")
    assert {c.object for c in streamed.chunks} == {"chat.completion.chunk"}


@pytest.fixture(scope="module")
def template_server(serving_dirs, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "marker.jinja"
    # bos_token first, as many HF templates write it: the server must not double BOS.
    template.write_text(
        "{{ bos_token }}[[MARKER]]{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    flags = ("--max-batch-size", "2", "--max-model-len", "256", "--chat-template", str(template))
    with ServerThread(*serving_dirs, *flags) as server:
        yield server


def test_chat_template_flag(template_server, model_name, tokenizer):
    tclient = OpenAI(base_url=template_server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    rendered = "[[MARKER]]SYSTEM: Be kind.\nUSER: Hi\nASSISTANT:"
    result = chat(tclient, model_name, messages, max_tokens=8)
    assert result.usage.prompt_tokens == n_tokens(tokenizer, rendered)
    assert result.choices[0].message.content == complete(tclient, model_name, rendered, max_tokens=8).choices[0].text
    zephyr = chat(tclient, model_name, user("Hi"), max_tokens=1)
    assert zephyr.usage.prompt_tokens == n_tokens(tokenizer, "[[MARKER]]USER: Hi\nASSISTANT:")
