"""The tutorial's contract: POST / on a live server, called with requests and curl."""

from __future__ import annotations

import datetime
import json
import re
import subprocess
import threading
import time

import pytest
import requests

from openelm_server.tokenizer import load_tokenizer


def post(server, body, **kwargs):
    return requests.post(server.url + "/", json=body, timeout=60, **kwargs)


def assert_tutorial_error(response, status: int, fragment: str):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == status
    assert fragment in body["error"], body["error"]
    datetime.datetime.strptime(body["time"], "%Y-%m-%d %H:%M:%S")


@pytest.fixture(scope="module")
def tokenizer(serving_dirs):
    return load_tokenizer(serving_dirs[1])


def test_answer_has_the_tutorials_shape(server, tokenizer):
    response = post(server, {"prompt": "Once upon a time there was"})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"response", "status", "time"}
    assert body["status"] == 200
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", body["time"])
    assert body["response"].startswith("Once upon a time there was")


def test_default_is_greedy_to_max_length_384(server, tokenizer):
    prompt = "The quick brown fox"
    body = post(server, {"prompt": prompt}).json()
    prompt_tokens = len(tokenizer(prompt).input_ids)
    completion = requests.post(
        server.url + "/v1/completions",
        timeout=60,
        json={"prompt": prompt, "temperature": 0, "max_tokens": 384 - prompt_tokens},
    ).json()
    assert body["response"] == prompt + completion["choices"][0]["text"]
    if completion["choices"][0]["finish_reason"] == "length":
        assert completion["usage"]["total_tokens"] == 384
    again = post(server, {"prompt": prompt}).json()
    assert again["response"] == body["response"]
    explicit = post(server, {"prompt": prompt, "max_length": 384}).json()
    assert explicit["response"] == body["response"]
    shorter = post(server, {"prompt": prompt, "max_length": prompt_tokens + 5}).json()
    assert body["response"].startswith(shorter["response"])


def test_max_new_tokens_wins_over_max_length(server):
    a = post(server, {"prompt": "Hello", "max_new_tokens": 4, "max_length": 300}).json()["response"]
    b = post(server, {"prompt": "Hello", "max_new_tokens": 4}).json()["response"]
    assert a == b


def test_curl_as_in_the_tutorial(server):
    for extra in ([], ["-H", "Content-Type: application/json"]):
        output = subprocess.run(
            ["curl", "-s", "-X", "POST", server.url, *extra, "-d", '{"prompt": "你好"}'],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        body = json.loads(output)
        assert body["status"] == 200 and body["response"].startswith("你好")


def test_sampling_with_seed_is_reproducible(server):
    body = {
        "prompt": "Once",
        "do_sample": True,
        "temperature": 0.9,
        "top_p": 0.9,
        "top_k": 40,
        "repetition_penalty": 1.2,
        "seed": 7,
        "max_new_tokens": 20,
    }
    assert post(server, body).json()["response"] == post(server, body).json()["response"]


def test_stop_string_cuts_the_response(server):
    full = post(server, {"prompt": "Once upon", "max_new_tokens": 24}).json()["response"]
    continuation = full[len("Once upon") :]
    stop = continuation[4:9]
    cut = post(server, {"prompt": "Once upon", "max_new_tokens": 24, "stop": stop}).json()["response"]
    assert cut == full[: len("Once upon") + continuation.index(stop)]


def test_streaming_plain_text_equals_the_response(server):
    body = {"prompt": "你好，请介绍一下你自己。", "max_new_tokens": 24}
    expected = post(server, body).json()["response"]
    with requests.post(server.url + "/", json={**body, "stream": True}, stream=True, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        pieces = [chunk for chunk in response.iter_content(chunk_size=None, decode_unicode=True)]
    assert "".join(pieces) == expected
    assert len(pieces) > 1


def test_unknown_fields_are_ignored(server):
    assert post(server, {"prompt": "Hi", "max_new_tokens": 2, "whatever": [1, 2]}).status_code == 200


def test_log_line_as_in_the_tutorial(server):
    post(server, {"prompt": "log me please", "max_new_tokens": 3})
    time.sleep(0.2)
    assert re.search(
        r'\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] ", prompt:"log me please", response:"\'log me please', server.log()
    )


def test_health_answers_during_a_long_generation(server):
    result = {}

    def long_call():
        result["response"] = post(server, {"prompt": "Once", "max_new_tokens": 300})

    thread = threading.Thread(target=long_call)
    thread.start()
    time.sleep(0.3)
    start = time.monotonic()
    health = requests.get(server.url + "/health", timeout=10)
    took = time.monotonic() - start
    thread.join()
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["model"]
    assert took < 2.0
    assert result["response"].status_code == 200


# ---- bad input: a clear 4xx, never a 500, and the server goes on --------------------------

RAW_BAD_BODIES = [
    (b"not json at all", "not valid JSON"),
    (b"", "body is empty"),
    (b"[1, 2, 3]", "must be a JSON object"),
    (b'"just a string"', "must be a JSON object"),
    (b"42", "must be a JSON object"),
    (b"null", "must be a JSON object"),
    (b'{"prompt": "\xff\xfe invalid utf-8"}', "could not be parsed"),
    (b"[" * 100_000 + b"]" * 100_000, "could not be parsed"),
    (b'{"prompt": "a", "temperature": NaN}', "temperature"),
    (b'{"prompt": "a", "top_p": Infinity}', "top_p"),
    (b'{"prompt": "\\ud800"}', "prompt"),
]


@pytest.mark.parametrize("raw, fragment", RAW_BAD_BODIES, ids=[f"raw{i}" for i in range(len(RAW_BAD_BODIES))])
def test_raw_bad_bodies(server, raw, fragment):
    response = requests.post(server.url + "/", data=raw, headers={"Content-Type": "application/json"}, timeout=30)
    assert_tutorial_error(response, 400, fragment)


BAD_FIELDS = [
    ({}, "prompt: Field required"),
    ({"prompt": None}, "prompt"),
    ({"prompt": 5}, "prompt: Input should be a valid string"),
    ({"prompt": ["a"]}, "prompt"),
    ({"prompt": "a", "max_length": "100"}, "max_length"),
    ({"prompt": "a", "max_length": 0}, "max_length"),
    ({"prompt": "a", "max_length": 3000}, "max_length is 3000"),
    ({"prompt": "a", "max_new_tokens": -1}, "max_new_tokens"),
    ({"prompt": "a", "max_new_tokens": 10**9}, "max_new_tokens"),
    ({"prompt": "a", "max_new_tokens": 1.5}, "max_new_tokens"),
    ({"prompt": "a", "do_sample": "yes"}, "do_sample"),
    ({"prompt": "a", "temperature": -0.5}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "top_p": 1.5}, "top_p"),
    ({"prompt": "a", "top_k": -1}, "top_k"),
    ({"prompt": "a", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "a", "seed": "x"}, "seed"),
    ({"prompt": "a", "seed": 2**70}, "seed"),
    ({"prompt": "a", "stop": 5}, "stop"),
    ({"prompt": "a", "stop": [""]}, "stop"),
    ({"prompt": "a", "stop": ["x"] * 100}, "stop"),
]


@pytest.mark.parametrize("body, fragment", BAD_FIELDS, ids=[f"field{i}" for i in range(len(BAD_FIELDS))])
def test_bad_fields(server, body, fragment):
    assert_tutorial_error(post(server, body), 400, fragment)


def test_prompt_longer_than_the_context(server):
    response = post(server, {"prompt": "hello " * 3000})
    assert response.status_code == 400
    assert "tokens" in response.json()["error"] or "characters" in response.json()["error"]


def test_prompt_that_leaves_no_room_under_max_length(server):
    assert_tutorial_error(post(server, {"prompt": "hello " * 50, "max_length": 10}), 400, "no room under max_length")


def test_wrong_method_and_path(server):
    assert requests.put(server.url + "/", json={}, timeout=10).status_code == 405  # GET / is the web page
    assert requests.post(server.url + "/nope", json={}, timeout=10).status_code == 404


def test_server_still_serves_after_all_that(server):
    assert post(server, {"prompt": "still alive?", "max_new_tokens": 2}).status_code == 200
    assert server.process.poll() is None


# ---- start-up ------------------------------------------------------------------------------


def run_api(*args, timeout=60):
    import sys

    from conftest import ROOT

    return subprocess.run(
        [sys.executable, str(ROOT / "api.py"), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def test_help_documents_every_setting():
    output = run_api("--help").stdout
    for flag, env in [
        ("--model-path", "MODEL_PATH"),
        ("--tokenizer-path", "TOKENIZER_PATH"),
        ("--host", "HOST"),
        ("--port", "PORT"),
        ("--device", "DEVICE"),
        ("--dtype", "DTYPE"),
        ("--max-batch-size", "MAX_BATCH_SIZE"),
        ("--max-queue", "MAX_QUEUE"),
        ("--api-key", "API_KEY"),
    ]:
        assert flag in output and env in output
    assert "6006" in output and "/root/autodl-tmp/OpenELM-3B-Instruct" in output


def test_missing_model_directory_says_what_to_do(tmp_path, serving_dirs):
    result = run_api("--model-path", str(tmp_path / "absent"), "--tokenizer-path", str(serving_dirs[1]))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    assert "bash download.sh" in lines[0] and "--model-path" in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_tokenizer_directory_says_what_to_do(tmp_path, serving_dirs):
    result = run_api("--model-path", str(serving_dirs[0]), "--tokenizer-path", str(tmp_path / "absent"))
    assert result.returncode != 0 and "bash download.sh" in result.stderr and "--tokenizer-path" in result.stderr
    assert "Traceback" not in result.stderr


def test_cuda_asked_for_without_a_gpu(serving_dirs):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_api("--model-path", str(serving_dirs[0]), "--tokenizer-path", str(serving_dirs[1]), "--device", "cuda")
    assert result.returncode != 0 and "no CUDA GPU" in result.stderr and "Traceback" not in result.stderr


def test_bad_flag_values_are_refused():
    result = run_api("--dtype", "int3")
    assert result.returncode == 2 and "--dtype" in result.stderr
    result = run_api("--max-batch-size", "0")
    assert result.returncode == 2 and "max-batch-size" in result.stderr


def test_settings_from_environment_and_flags():
    from openelm_server.config import load_settings

    settings = load_settings(
        ["--port", "7000"],
        {"PORT": "8000", "MODEL_PATH": "/m/OpenELM-3B-Instruct", "DEVICE": "cpu", "LOG_PROMPTS": "0"},
    )
    assert settings.port == 7000 and settings.device == "cpu" and not settings.log_prompts
    assert settings.model_name == "OpenELM-3B-Instruct"
    defaults = load_settings([], {})
    assert (defaults.host, defaults.port, defaults.device, defaults.dtype) == ("0.0.0.0", 6006, "auto", "auto")


def test_auto_device_and_dtype_on_this_machine(start_server, serving_dirs):
    import torch

    server = start_server(*serving_dirs, "--max-batch-size", "2")
    log = server.log()
    if torch.cuda.is_available():
        assert "device auto: CUDA" in log and "bfloat16" in log
    else:
        assert "device auto: no CUDA GPU found, using the CPU" in log and "in float32" in log
    assert "KV cache: 4096 tokens" in log  # 2 x the context of 2048
