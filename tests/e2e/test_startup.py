"""Starting ``python api.py``: --help, settings and the port checked before the model loads, and
one clear line per error, no traceback."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from cli_checks import assert_one_error_line, run_api
from conftest import ROOT

from openelm_server.testing.server import free_port

LOADING = "loading OpenELM from"


def served(serving_dirs, *flags: str) -> list[str]:
    model_dir, tokenizer_dir = serving_dirs
    return ["--model-path", str(model_dir), "--tokenizer-path", str(tokenizer_dir), "--host", "127.0.0.1", *flags]


def test_help_imports_neither_torch_nor_transformers():
    # --help answers at once: the heavy libraries are imported only after the flags are read.
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['api.py', '--help']\n"
        "try:\n"
        "    runpy.run_path('api.py', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'fastapi') if m in sys.modules), file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.stderr.strip() == "[]"
    assert "--port" in result.stdout


def test_help_shows_no_empty_defaults():
    output = run_api("--help").stdout
    assert "(default: None)" not in output and "(default: ())" not in output
    assert "(default: 6006)" in output


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


@pytest.mark.parametrize(
    "flags, env, expected",
    [
        (["--port", "70000"], {}, "--port: must be a port number from 1 to 65535, got 70000"),
        (["--port", "0"], {}, "got 0"),
        ([], {"PORT": "http"}, "--port: must be a whole number, got 'http'"),
        (["--request-timeout", "soon"], {}, "--request-timeout: must be a number"),
        (["--demo", "--model-path", "/data/OpenELM-3B-Instruct"], {}, "--demo serves a model and tokenizer of its own"),
    ],
)
def test_bad_settings_are_one_line(flags, env, expected):
    result = run_api(*flags, env=env)
    assert result.returncode == 2
    assert_one_error_line(result, expected)
    assert "usage:" not in result.stderr


def test_bad_flag_values_are_refused():
    result = run_api("--dtype", "int3")
    assert result.returncode == 2 and "--dtype" in result.stderr
    result = run_api("--max-batch-size", "0")
    assert result.returncode == 2 and "max-batch-size" in result.stderr


def test_port_in_use_is_reported_before_loading(serving_dirs):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_api(*served(serving_dirs, "--port", str(port)))
    assert_one_error_line(result, f"port {port} is already in use", "--port")
    assert LOADING not in result.stdout


def test_host_that_is_not_this_machine(serving_dirs):
    model_dir, tokenizer_dir = serving_dirs
    result = run_api(
        "--model-path",
        str(model_dir),
        "--tokenizer-path",
        str(tokenizer_dir),
        "--host",
        "192.0.2.123",
        "--port",
        str(free_port()),
    )  # TEST-NET-1: never a local address
    assert_one_error_line(result, "--host 192.0.2.123", "not an address of this machine")
    assert LOADING not in result.stdout


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


def test_missing_draft_model_directory_says_what_to_do(tmp_path, serving_dirs):
    model, tokenizer = (str(d) for d in serving_dirs)
    result = run_api("--model-path", model, "--tokenizer-path", tokenizer, "--draft-model-path", str(tmp_path / "no"))
    assert result.returncode != 0 and "DRAFT=1 bash download.sh" in result.stderr
    assert "--draft-model-path" in result.stderr and "Traceback" not in result.stderr


def test_cuda_asked_for_without_a_gpu(serving_dirs):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_api("--model-path", str(serving_dirs[0]), "--tokenizer-path", str(serving_dirs[1]), "--device", "cuda")
    assert result.returncode != 0 and "no CUDA GPU" in result.stderr and "Traceback" not in result.stderr


def test_model_directory_as_tokenizer_directory(serving_dirs):
    model_dir, _ = serving_dirs
    result = run_api(*served((model_dir, model_dir), "--port", str(free_port())))
    assert_one_error_line(result, "no tokenizer.model", "Llama-2")
    assert LOADING not in result.stdout


def test_broken_tokenizer_file(tmp_path, serving_dirs):
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    result = run_api(*served((serving_dirs[0], tmp_path), "--port", str(free_port())))
    assert_one_error_line(result, str(tmp_path), "cannot load the tokenizer")
    assert LOADING not in result.stdout


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path, serving_dirs):
    from openelm_server.testing.checkpoints import write_tiny_checkpoint

    model_dir = write_tiny_checkpoint(tmp_path / "small-vocab", vocab_size=64)
    result = run_api(*served((model_dir, serving_dirs[1]), "--port", str(free_port())))
    assert_one_error_line(result, "more than the model's 64", "--tokenizer-path")
    assert LOADING not in result.stdout


def test_directory_without_weights(tmp_path, serving_dirs):
    (tmp_path / "config.json").write_text((serving_dirs[0] / "config.json").read_text())
    result = run_api(*served((tmp_path, serving_dirs[1]), "--port", str(free_port())))
    assert_one_error_line(result, "no model.safetensors")
    assert LOADING not in result.stdout


def test_missing_chat_template_file(tmp_path, serving_dirs):
    result = run_api(*served(serving_dirs, "--port", str(free_port()), "--chat-template", str(tmp_path / "chat.jinja")))
    assert_one_error_line(result, "chat.jinja", "cannot read the chat template")
    assert LOADING not in result.stdout
