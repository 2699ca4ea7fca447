"""A field the server does not know is a 400 that names it, on every route family: never silently
ignored (a client that sends one expects it to do something)."""

from __future__ import annotations

import pytest

CASES = [
    ("/", {"prompt": "Hi", "history": []}, "history"),
    ("/", {"prompt": "Hi", "max_new_tokens": 2, "whatever": [1, 2]}, "whatever"),
    ("/", {"prompt": "Hi", "max_new_tokens": 2, "temprature": 0.5}, "temprature"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "best_of_n": 2}, "best_of_n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "store": True}, "store"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi", "name": "ann"}]}, "messages.0.name"),
    (
        "/v1/completions",
        {"prompt": "Hi", "max_tokens": 2, "stream": True, "stream_options": {"continuous_usage_stats": True}},
        "stream_options.continuous_usage_stats",
    ),
    ("/tokenize", {"prompt": "Hi", "lang": "en"}, "lang"),
]


@pytest.mark.parametrize("path,body,field", CASES, ids=[f"{p} {f}" for p, _, f in CASES])
def test_an_unknown_field_is_refused_by_name(app, path, body, field):
    response = app.post(path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    message = error if isinstance(error, str) else error["message"]
    assert f"{field}: not supported by this server" in message
    if isinstance(error, dict):
        assert error["param"] == field


def test_the_known_fields_still_work(app):
    assert app.post_ok("/", {"prompt": "Hi", "max_new_tokens": 2})["status"] == 200
    assert app.post_ok("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "user": "ann"})["choices"]
