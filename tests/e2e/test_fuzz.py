"""Fuzzing the HTTP API: no input may produce a 5xx.

Two parts against one live server with small limits (so that every accepted request is quick):

* schemathesis generates requests (valid and invalid) from the server's own OpenAPI schema;
* a hand-made list of hostile bodies is sent raw to POST /, /v1/completions and
  /v1/chat/completions: every answer must be a JSON 4xx error in the route family's shape, or
  a 200 where the input is legitimately valid.
"""

from __future__ import annotations

import json

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from openelm_server.serving.errors import OPENAI_SHAPED_PATHS

BODY_LIMIT = 200_000
MAX_TOKENS_LIMIT = 16
FLAGS = (
    "--max-batch-size",
    "8",
    "--max-model-len",
    "128",
    "--max-tokens-limit",
    str(MAX_TOKENS_LIMIT),
    "--max-body-bytes",
    str(BODY_LIMIT),
    "--max-queue",
    "256",
)
ROUTES = ("/", "/v1/completions", "/v1/chat/completions")


@pytest.fixture(scope="module")
def fuzz_server(start_server, serving_dirs):
    model_dir, tokenizer_dir = serving_dirs
    return start_server(model_dir, tokenizer_dir, *FLAGS, env={"API_KEY": ""})


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    schema.config.generation.update(modes=list(GenerationMode), max_examples=25)
    schema.config.output.sanitization.update(enabled=False)  # "max_tokens" is not a secret
    return schema


def assert_error_shape(path: str, response: requests.Response) -> None:
    """A 4xx must be JSON in the shape of its route family."""
    content_type = response.headers.get("content-type", "")
    if isinstance(content_type, list):  # schemathesis' responses keep every value of a header
        content_type = content_type[0] if content_type else ""
    assert content_type.startswith("application/json"), response.headers
    body = response.json()
    if path.startswith(OPENAI_SHAPED_PATHS):
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    else:
        assert set(body) == {"error", "status", "time"} and body["status"] == response.status_code, body


# ---- schemathesis ----------------------------------------------------------------------------

schema = schemathesis.pytest.from_fixture("fuzz_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
def test_generated_requests_never_get_a_server_error(case, fuzz_server):
    response = case.call(timeout=60)
    case.validate_response(response, checks=[not_a_server_error])
    if 400 <= response.status_code < 500:
        assert_error_shape(case.path, response)


# ---- hand-made hostile bodies ----------------------------------------------------------------


def valid(path: str, **extra) -> dict:
    if path == "/":
        body = {"prompt": "Hello", "max_new_tokens": 4}
    elif path == "/v1/completions":
        body = {"prompt": "Hello", "max_tokens": 4}
    else:
        body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    body.update(extra)
    return body


def raw(body: dict) -> bytes:
    return json.dumps(body).encode()


def with_literal(path: str, field: str, literal: str) -> bytes:
    """A body whose ``field`` holds a raw JSON literal (NaN, 1e999, a huge integer...)."""
    body = valid(path)
    body[field] = "@@LITERAL@@"
    return raw(body).replace(b'"@@LITERAL@@"', literal.encode())


def with_prompt_literal(path: str, literal: str) -> bytes:
    """A body whose prompt (or chat message content) is a raw JSON string literal."""
    if path == "/v1/chat/completions":
        return f'{{"messages":[{{"role":"user","content":{literal}}}],"max_tokens":4}}'.encode()
    tokens = "max_new_tokens" if path == "/" else "max_tokens"
    return f'{{"prompt":{literal},"{tokens}":4}}'.encode()


def sized(path: str, size: int, field: str | None) -> bytes:
    """A body of exactly ``size`` bytes, padded in ``field`` (the prompt) or, with no field, with
    whitespace after the JSON object (every field the server does not know is refused)."""
    body = valid(path)
    if field is None:
        data = raw(body)
        return data + b" " * (size - len(data))
    if path == "/v1/chat/completions":
        body["messages"][0]["content"] = ""
    else:
        body["prompt"] = ""
    pad = size - len(raw(body))
    if path == "/v1/chat/completions":
        body["messages"][0]["content"] = "a" * pad
    else:
        body["prompt"] = "a" * pad
    data = raw(body)
    assert len(data) == size
    return data


OK = {200}
BAD = {400}


def cases_for(path: str) -> list[tuple[str, bytes, set[int]]]:
    """(name, body, allowed statuses) for one route."""
    tokens = {"/": "max_new_tokens", "/v1/completions": "max_tokens", "/v1/chat/completions": "max_tokens"}[path]
    prompt_field = "messages" if path == "/v1/chat/completions" else "prompt"
    cases: list[tuple[str, bytes, set[int]]] = [
        ("valid", raw(valid(path)), OK),
        # Not a JSON object at all.
        ("empty body", b"", BAD),
        ("whitespace body", b"  \n\t ", BAD),
        ("list", b"[]", BAD),
        ("list of object", b"[" + raw(valid(path)) + b"]", BAD),
        ("number", b"1", BAD),
        ("string", b'"prompt"', BAD),
        ("null", b"null", BAD),
        ("true", b"true", BAD),
        ("truncated", raw(valid(path))[:-1], BAD),
        ("single quotes", b"{'prompt': 'Hello'}", BAD),
        ("trailing garbage", raw(valid(path)) + b"}", BAD),
        ("two objects", raw(valid(path)) + raw(valid(path)), BAD),
        ("nul byte", b"\x00", BAD),
        # Encodings.
        ("invalid utf-8 bytes", with_prompt_literal(path, '"x"').replace(b'"x"', b'"\xff\xfe"'), BAD),
        ("invalid utf-8 at start", b"\xff" + raw(valid(path)), BAD),
        ("overlong utf-8", with_prompt_literal(path, '"x"').replace(b'"x"', b'"\xc0\xaf"'), BAD),
        ("truncated utf-8", with_prompt_literal(path, '"x"').replace(b'"x"', b'"\xe4\xbd"'), BAD),
        ("utf-8 bom", b"\xef\xbb\xbf" + raw(valid(path)), {200, 400}),
        ("utf-16 body", json.dumps(valid(path)).encode("utf-16"), {200, 400}),
        ("lone high surrogate", with_prompt_literal(path, '"a\\ud800b"'), BAD),
        ("lone low surrogate", with_prompt_literal(path, '"\\udfff"'), BAD),
        ("reversed surrogate pair", with_prompt_literal(path, '"\\ude00\\ud83d"'), BAD),
        ("valid surrogate pair", with_prompt_literal(path, '"\\ud83d\\ude00 emoji"'), OK),
        ("surrogate in stop", raw(valid(path)).replace(b"}", b',"stop":"\\ud800"}'), BAD),
        ("surrogate in an ignored key", raw(valid(path)).replace(b"{", b'{"\\ud800":1,', 1), {200, 400}),
        ("control characters", with_prompt_literal(path, '"\\u0000\\u0007\\u001b[31m\\u202e\\ufeff\\u2028end"'), OK),
        ("only special tokens", with_prompt_literal(path, '"</s><s></s><unk>"'), OK),
        ("empty prompt", with_prompt_literal(path, '""'), OK),
        ("null prompt", with_prompt_literal(path, "null"), BAD),
        ("missing prompt", raw({tokens: 4}), BAD),
        # Duplicated keys: the last one wins, as in Python's json.
        ("duplicated keys", raw(valid(path))[:-1] + f', "{tokens}": 2}}'.encode(), OK),
        # Non-finite numbers (Python's json accepts these literals).
        *[
            (f"{literal} {field}", with_literal(path, field, literal), BAD)
            for field in ("temperature", "top_p", "repetition_penalty", tokens, "seed", "top_k")
            for literal in ("NaN", "Infinity", "-Infinity", "1e999")
        ],
        # Huge and negative integers.
        (f"huge {tokens}", with_literal(path, tokens, str(10**30)), BAD),
        (f"4400-digit {tokens}", with_literal(path, tokens, "9" * 4400), BAD),
        (f"zero {tokens}", with_literal(path, tokens, "0"), BAD),
        (f"negative {tokens}", with_literal(path, tokens, "-1"), BAD),
        (f"{tokens} over the limit", with_literal(path, tokens, str(MAX_TOKENS_LIMIT + 1)), BAD),
        (f"float {tokens}", with_literal(path, tokens, "4.0"), BAD),
        ("seed 2**64", with_literal(path, "seed", str(2**64)), BAD),
        ("seed 2**64-1", with_literal(path, "seed", str(2**64 - 1)), OK),
        ("seed -2**63", with_literal(path, "seed", str(-(2**63))), OK),
        ("seed -2**63-1", with_literal(path, "seed", str(-(2**63) - 1)), BAD),
        ("seed -1", with_literal(path, "seed", "-1"), OK),
        ("huge top_k", with_literal(path, "top_k", str(10**30)), {200, 400}),
        ("negative top_k", with_literal(path, "top_k", "-1"), BAD),
        ("negative temperature", with_literal(path, "temperature", "-0.5"), BAD),
        ("negative zero temperature", with_literal(path, "temperature", "-0.0"), OK),
        ("huge temperature", with_literal(path, "temperature", "1e308"), BAD),
        # OpenAI accepts top_p 0 (only the best token); the tutorial's transformers semantics do not.
        ("top_p zero", with_literal(path, "top_p", "0"), BAD if path == "/" else OK),
        ("top_p over one", with_literal(path, "top_p", "1.0000001"), BAD),
        ("repetition_penalty zero", with_literal(path, "repetition_penalty", "0"), BAD),
        ("repetition_penalty 10", with_literal(path, "repetition_penalty", "10"), OK),
        # Wrong types.
        *[
            (f"{field}={literal}", with_literal(path, field, literal), BAD)
            for field, literals in {
                tokens: ('"4"', "true", "[]", "{}", '"abc"'),
                "temperature": ('"0.5"', "true", "[]", "{}"),
                "top_p": ('"0.5"', "false", "[0.5]"),
                "top_k": ('"5"', "5.5", "true"),
                "repetition_penalty": ('"1.2"', "true", "{}"),
                "seed": ('"1"', "1.5", "true", "[1]"),
                "stop": ("5", "[5]", "{}", "true", '[""]', '""', json.dumps(["x"] * 17), json.dumps("x" * 257)),
                "stream": ('"true"', "1", "0", "[]", *(["null"] if path == "/" else [])),
            }.items()
            for literal in literals
        ],
        # Sizes: just under and just over the body limit.
        ("body at the limit, huge prompt", sized(path, BODY_LIMIT, "prompt"), BAD),
        ("body at the limit, padded with whitespace", sized(path, BODY_LIMIT, None), OK),
        ("body one byte over the limit", sized(path, BODY_LIMIT + 1, None), {413}),
        ("body 2 MB", b'{"prompt": "' + b"a" * 2_000_000 + b'"}', {413}),
        # Deep nesting.
        ("100k [", b"[" * 100_000, BAD),
        ("100k [] balanced", b"[" * 50_000 + b"]" * 50_000, BAD),
        ("deep nesting in the prompt", f'{{"{prompt_field}": '.encode() + b"[" * 60_000 + b"]" * 60_000 + b"}", BAD),
        ("deep objects", b'{"a":' * 30_000 + b"1" + b"}" * 30_000, BAD),
    ]
    if path == "/":
        cases += [
            ("do_sample wrong type", with_literal(path, "do_sample", '"yes"'), BAD),
            # max_new_tokens wins over max_length (transformers' rule), so these leave it out.
            ("max_length zero", b'{"prompt": "Hello", "max_length": 0}', BAD),
            ("max_length huge", b'{"prompt": "Hello", "max_length": %d}' % 10**30, BAD),
            ("max_length wrong type", b'{"prompt": "Hello", "max_length": "10"}', BAD),
            ("max_length NaN", b'{"prompt": "Hello", "max_length": NaN}', BAD),
            ("max_length within limits", b'{"prompt": "Hello", "max_length": 6}', OK),
            ("max_length ignored when max_new_tokens is given", with_literal(path, "max_length", str(10**30)), OK),
            ("prompt list", raw({"prompt": ["a", "b"], "max_new_tokens": 4}), BAD),
            ("prompt object", raw({"prompt": {"text": "a"}, "max_new_tokens": 4}), BAD),
            ("prompt number", raw({"prompt": 5, "max_new_tokens": 4}), BAD),
            ("tutorial default max_length", raw({"prompt": "Hello"}), {200, 400}),
        ]
    else:
        cases += [
            ("unknown model", raw(valid(path, model="gpt-4")), {404}),
            ("model wrong type", raw(valid(path, model=5)), BAD),
            ("model with control chars", raw(valid(path, model="\u0000\n\u202e")), {404}),
            ("n 2", raw(valid(path, n=2)), OK),
            ("n 17", raw(valid(path, n=17)), BAD),
            ("n null", raw(valid(path, n=None)), OK),
            ("n huge", with_literal(path, "n", str(10**30)), BAD),
            ("logprobs true", raw(valid(path, logprobs=True)), OK if path == "/v1/chat/completions" else BAD),
            ("logprobs 21", raw(valid(path, logprobs=21)), BAD),
            ("presence_penalty 3", raw(valid(path, presence_penalty=3)), BAD),
            ("frequency_penalty -3", raw(valid(path, frequency_penalty=-3)), BAD),
            ("presence_penalty NaN", with_literal(path, "presence_penalty", "NaN"), BAD),
            ("stream_options wrong type", raw(valid(path, stream=True, stream_options="yes")), BAD),
            (
                "stream_options.include_usage wrong",
                raw(valid(path, stream=True, stream_options={"include_usage": 1})),
                BAD,
            ),
            ("user wrong type", raw(valid(path, user=["x"])), BAD),
            ("user control chars", raw(valid(path, user="\u0000\u0001")), OK),
        ]
    if path == "/v1/completions":
        cases += [
            ("prompt empty list", raw(valid(path, prompt=[])), BAD),
            ("prompt list of empty", raw(valid(path, prompt=[""])), OK),
            ("prompt list of 65", raw(valid(path, prompt=["a"] * 65)), BAD),
            ("prompt token ids", raw(valid(path, prompt=[1, 2, 3])), OK),
            ("prompt lists of token ids", raw(valid(path, prompt=[[1, 2], [3]])), OK),
            ("prompt token id beyond the vocabulary", raw(valid(path, prompt=[1, 10**9])), BAD),
            ("prompt negative token id", raw(valid(path, prompt=[1, -1])), BAD),
            ("prompt empty token ids", raw(valid(path, prompt=[[]])), BAD),
            ("prompt mixed text and ids", raw(valid(path, prompt=["a", [1]])), BAD),
            ("prompt nested list", raw(valid(path, prompt=[["a"]])), BAD),
            ("prompt list with surrogate", with_prompt_literal(path, '["ok", "\\ud800"]'), BAD),
            ("echo wrong type", raw(valid(path, echo="yes")), BAD),
            ("suffix", raw(valid(path, suffix="x")), BAD),
            ("best_of 2", raw(valid(path, best_of=2)), BAD),
        ]
    if path == "/v1/chat/completions":
        cases += [
            ("messages empty", raw(valid(path, messages=[])), BAD),
            ("messages string", raw(valid(path, messages="Hello")), BAD),
            ("messages object", raw(valid(path, messages={"role": "user", "content": "Hello"})), BAD),
            ("messages of numbers", raw(valid(path, messages=[1])), BAD),
            ("message without content", raw(valid(path, messages=[{"role": "user"}])), BAD),
            ("message without role", raw(valid(path, messages=[{"content": "Hi"}])), BAD),
            ("message bad role", raw(valid(path, messages=[{"role": "root", "content": "Hi"}])), BAD),
            ("message null content", raw(valid(path, messages=[{"role": "user", "content": None}])), BAD),
            ("message content number", raw(valid(path, messages=[{"role": "user", "content": 5}])), BAD),
            (
                "content part image",
                raw(
                    valid(
                        path,
                        messages=[
                            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}
                        ],
                    )
                ),
                BAD,
            ),
            (
                "content part without text",
                raw(valid(path, messages=[{"role": "user", "content": [{"type": "text"}]}])),
                BAD,
            ),
            (
                "content parts",
                raw(
                    valid(
                        path,
                        messages=[
                            {
                                "role": "user",
                                "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}],
                            }
                        ],
                    )
                ),
                OK,
            ),
            ("empty content", raw(valid(path, messages=[{"role": "user", "content": ""}])), OK),
            ("only system", raw(valid(path, messages=[{"role": "system", "content": "Be brief"}])), {200, 400}),
            ("only assistant", raw(valid(path, messages=[{"role": "assistant", "content": "Hi"}])), {200, 400}),
            ("1025 messages", raw(valid(path, messages=[{"role": "user", "content": "a"}] * 1025)), BAD),
            (
                "special tokens in template",
                raw(valid(path, messages=[{"role": "user", "content": "<|user|>\n</s><|assistant|>{{ x }}{% if %}"}])),
                OK,
            ),
            ("max_completion_tokens over", raw(valid(path, max_completion_tokens=MAX_TOKENS_LIMIT + 1)), BAD),
            ("max_completion_tokens NaN", with_literal(path, "max_completion_tokens", "NaN"), BAD),
        ]
    return cases


# Sampling values inside their documented ranges that are extreme enough to break the
# sampler's float arithmetic (1e-300 is 0 in float32; 5e-324 is the smallest double).
TINY_SAMPLING = [
    ("tiny temperature", {"temperature": 1e-300}),
    ("denormal temperature", {"temperature": 5e-324}),
    ("tiny top_p", {"temperature": 1.0, "top_p": 1e-300}),
    ("denormal top_p", {"temperature": 1.0, "top_p": 5e-324}),
    ("tiny repetition_penalty", {"temperature": 1.0, "repetition_penalty": 1e-300}),
    ("huge temperature", {"temperature": 100.0}),
    ("tiny temperature top_k 1", {"temperature": 1e-300, "top_k": 1}),
]


def all_cases():
    for path in ROUTES:
        for name, body, allowed in cases_for(path):
            yield pytest.param(path, body, allowed, id=f"{path} {name}")
        for name, extra in TINY_SAMPLING:
            sampled = dict(extra, do_sample=True) if path == "/" else extra
            yield pytest.param(path, raw(valid(path, **sampled, seed=3)), OK, id=f"{path} {name}")


@pytest.mark.parametrize("path,body,allowed", all_cases())
def test_hostile_body(fuzz_server, path, body, allowed):
    response = requests.post(
        fuzz_server.url + path, data=body, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert response.status_code < 500, f"{response.status_code}: {response.text[:300]}"
    assert response.status_code in allowed, f"{response.status_code}: {response.text[:300]}"
    if response.status_code >= 400:
        assert_error_shape(path, response)
    else:
        assert response.headers["content-type"].startswith("application/json")
        assert response.json()


@pytest.mark.parametrize("name,extra", TINY_SAMPLING, ids=[name for name, _ in TINY_SAMPLING])
def test_extreme_sampling_values_do_not_break_a_stream(fuzz_server, name, extra):
    body = valid("/v1/chat/completions", **extra, seed=3, stream=True)
    response = requests.post(fuzz_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code in (200, 400)
    if response.status_code == 200:
        events = [
            json.loads(line[6:])
            for line in response.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"
        ]
        errors = [e["error"] for e in events if "error" in e]
        assert not errors, errors
        assert response.text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/json; charset=utf-8",
        "application/xml",
        "application/json; charset=latin-1",
    ],
)
@pytest.mark.parametrize("path", ROUTES)
def test_any_content_type_is_read_as_json(fuzz_server, path, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = requests.post(fuzz_server.url + path, data=raw(valid(path)), headers=headers, timeout=60)
    assert response.status_code == 200, response.text[:300]


# GET / is the web page (or the server's JSON description), not a wrong method.
WRONG_METHODS = [
    (path, method) for path in ROUTES for method in ("GET", "PUT", "DELETE", "PATCH") if (method, path) != ("GET", "/")
]


@pytest.mark.parametrize("path, method", WRONG_METHODS)
def test_wrong_methods_are_405_in_the_route_shape(fuzz_server, path, method):
    response = requests.request(method, fuzz_server.url + path, data=b"{}", timeout=30)
    assert response.status_code == 405
    assert_error_shape(path, response)


@pytest.mark.parametrize(
    "path",
    [
        "/../../etc/passwd",
        "/v1/../v1/models/..%2f..%2f",
        "/%00",
        "/v1/%ff",
        "/" + "a" * 8000,
        "/v1/models?x=" + "%" * 100,
        "/health?\u202e=1",
    ],
)
def test_odd_paths_never_get_a_server_error(fuzz_server, path):
    response = requests.get(fuzz_server.url + path, timeout=30)
    assert response.status_code < 500


def test_the_server_still_answers_and_logged_no_unhandled_error(fuzz_server):
    response = requests.get(fuzz_server.url + "/health", timeout=10)
    assert response.status_code == 200 and response.json()["status"] == "ok"
    response = requests.post(fuzz_server.url + "/v1/completions", json=valid("/v1/completions"), timeout=60)
    assert response.status_code == 200
    log = fuzz_server.log()
    assert "Exception in ASGI application" not in log
    assert fuzz_server.process.poll() is None
