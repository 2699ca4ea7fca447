"""Errors of the OpenAI API as the SDK sees them: the exact error body, unknown models and the
names the model answers to, and every bad parameter a 400 naming it."""

from __future__ import annotations

import httpx
import openai
import pytest
from in_process import ServerThread
from openai import OpenAI
from openai_helpers import ENGLISH, ERROR_KEYS, assert_error_shape, chat, complete, user


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        complete(client, "gpt-4o", ENGLISH)
    assert_error_shape(caught.value, 404, "not_found_error", "model", "model_not_found")
    with pytest.raises(openai.NotFoundError) as caught:
        chat(client, "gpt-4o", user("Hi"), stream=True)
    assert_error_shape(caught.value, 404, "not_found_error", "model", "model_not_found")


@pytest.mark.parametrize(
    "published_name", ["OpenELM-3B-Instruct", "apple/OpenELM-3B-Instruct", "LLM-Research/OpenELM-3B-Instruct"]
)
def test_published_names_work_whatever_the_folder_is_called(client, model_name, published_name):
    # The test model's folder is not called OpenELM-3B-Instruct: the README's examples still work.
    assert model_name != "OpenELM-3B-Instruct"
    completion = complete(client, published_name, ENGLISH, max_tokens=2)
    assert completion.model == model_name
    assert chat(client, published_name, user("Hi"), max_tokens=2).model == model_name
    assert [m.id for m in client.models.list()] == [model_name]


def test_served_model_name_is_the_only_name(serving_dirs):
    with ServerThread(*serving_dirs, "--served-model-name", "my-model", "--max-batch-size", "2") as server:
        named = OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        assert complete(named, "my-model", ENGLISH, max_tokens=2).model == "my-model"
        with pytest.raises(openai.NotFoundError) as caught:
            complete(named, "OpenELM-3B-Instruct", ENGLISH, max_tokens=2)
    assert (
        "'my-model'" in assert_error_shape(caught.value, 404, "not_found_error", "model", "model_not_found")["message"]
    )


BAD_COMPLETIONS = [
    (dict(temperature=-1), "temperature", None),
    (dict(n=17), "n", None),
    (dict(max_tokens=0), "max_tokens", None),
    (dict(top_p=-0.1), "top_p", None),
    (dict(top_p=1.5), "top_p", None),
    (dict(prompt="word " * 3000), "prompt", "context_length_exceeded"),
    (dict(prompt="hello " * 600), "prompt", "context_length_exceeded"),
    (dict(max_tokens=600), "max_tokens", "context_length_exceeded"),
    (dict(max_tokens=5000), "max_tokens", None),
    (dict(best_of=3), "best_of", None),
    (dict(logprobs=21), "logprobs", None),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("override, param, code", BAD_COMPLETIONS, ids=[str(b[0])[:30] for b in BAD_COMPLETIONS])
def test_bad_completion_parameters_are_400(client, model_name, override, param, code, stream):
    kwargs = dict(prompt=ENGLISH, max_tokens=8, temperature=0, stream=stream) | override
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=model_name, **kwargs)
    assert_error_shape(caught.value, 400, "invalid_request_error", param, code)


BAD_CHATS = [
    (dict(temperature=-1), "temperature"),
    (dict(n=17), "n"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(top_p=-0.1), "top_p"),
    (dict(max_tokens=600), "max_tokens"),
    (dict(max_completion_tokens=600), "max_completion_tokens"),
    (dict(messages=user("word " * 3000)), "messages"),
    (dict(messages=[]), "messages"),
]


@pytest.mark.parametrize("override, param", BAD_CHATS, ids=[str(b[0])[:30] for b in BAD_CHATS])
def test_bad_chat_parameters_are_400(client, model_name, override, param):
    kwargs = dict(messages=user("Hi"), max_tokens=8, temperature=0) | override
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model_name, **kwargs)
    assert_error_shape(caught.value, 400, "invalid_request_error", param)


def test_bad_chat_role_is_400(server, model_name):
    response = httpx.post(
        server.url + "/v1/chat/completions",
        timeout=30,
        json={"model": model_name, "messages": [{"role": "wizard", "content": "Hi"}]},
    )
    assert response.status_code == 400
    assert set(response.json()["error"]) == ERROR_KEYS


def test_error_body_is_json_with_exact_shape(server, model_name):
    response = httpx.post(
        server.url + "/v1/completions", json={"model": model_name, "prompt": "Hi", "temperature": -1}, timeout=30
    )
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS and error["param"] == "temperature"
    assert error["type"] == "invalid_request_error"


def test_invalid_prompt_error_names_the_prompt_param(server, model_name):
    response = httpx.post(server.url + "/v1/completions", timeout=30, json={"model": model_name, "prompt": ["fine", 5]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] in ("prompt", "prompt.1"), response.json()
