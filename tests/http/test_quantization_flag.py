"""--quantization as a user sets it: the server serves with int8 linear layers, the flag has its
env twin, and a bad value or a conflicting flag stops start-up with one clear line."""

from __future__ import annotations

import json

import pytest
from in_process import InProcessServer

from openelm_server.config import load_settings
from openelm_server.model.quantize import Int8Linear


@pytest.fixture(scope="module")
def int8_app(shared_model_dir, shared_tokenizer_dir):
    server = InProcessServer(shared_model_dir, shared_tokenizer_dir, quantization="int8")
    yield server
    server.close()


@pytest.fixture(scope="module")
def reference(shared_model_dir) -> dict:
    return json.loads((shared_model_dir / "reference.json").read_text())


def test_the_server_serves_with_int8_linear_layers(int8_app, reference):
    model = int8_app.engine.model
    assert isinstance(model.lm_head, Int8Linear)
    assert all(isinstance(layer.ffn.proj_1, Int8Linear) for layer in model.transformer.layers)
    for case in reference["cases"]:
        answer = int8_app.post_ok("/v1/completions", {"prompt": case["prompt_ids"], "max_tokens": 4, "temperature": 0})
        assert answer["usage"]["completion_tokens"] == 4
        # Greedy int8 follows the float32 reference for at least 8 tokens in every case (test_int8.py).
        full = int8_app.tokenizer.decode(case["prompt_ids"] + case["greedy_ids"][:4], skip_special_tokens=True)
        prompt = int8_app.tokenizer.decode(case["prompt_ids"], skip_special_tokens=True)
        assert prompt + answer["choices"][0]["text"] == full


def test_int8_streams_the_same_text_it_answers_at_once(int8_app):
    body = {"model": int8_app.model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 12}
    whole = int8_app.post_ok("/v1/chat/completions", {**body, "temperature": 0})
    chunks = int8_app.stream("/v1/chat/completions", {**body, "temperature": 0})
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == whole["choices"][0]["message"]["content"]


def test_the_flag_and_its_env_twin():
    assert load_settings([], environ={}).quantization == "none"
    assert load_settings(["--quantization", "int8"], environ={}).quantization == "int8"
    assert load_settings([], environ={"QUANTIZATION": "int8"}).quantization == "int8"
    assert load_settings(["--quantization", "none"], environ={"QUANTIZATION": "int8"}).quantization == "none"


@pytest.mark.parametrize(
    "argv, environ, message",
    [
        (["--quantization", "int4"], {}, "error: --quantization must be none or int8, got 'int4'"),
        ([], {"QUANTIZATION": "fp8"}, "error: --quantization must be none or int8, got 'fp8'"),
        (
            ["--quantization", "int8", "--cpu-linear", "onednn"],
            {},
            "error: --cpu-linear chooses the kernel of float linear layers; "
            "with --quantization int8 every linear layer is int8",
        ),
    ],
)
def test_a_bad_setting_stops_start_up_with_one_line(capsys, argv, environ, message):
    with pytest.raises(SystemExit) as stopped:
        load_settings(argv, environ=environ)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(message), error
    assert len(error.strip().splitlines()) == 1
