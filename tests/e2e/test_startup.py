"""Starting the server: settings and the port checked before the model loads, one clear line
per error, the start-up log (loading, load time, an address to open), and the demo."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import requests
from conftest import ROOT, free_port

from openelm_server.listen import where_to_open

LOADING = "loading OpenELM from"


def run_api(*args, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "api.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def assert_one_error_line(result: subprocess.CompletedProcess, *expected: str) -> str:
    """The start-up stopped with one ``error:`` line that says each of ``expected``, no traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def served(serving_dirs, *flags: str) -> list[str]:
    model_dir, tokenizer_dir = serving_dirs
    return ["--model-path", str(model_dir), "--tokenizer-path", str(tokenizer_dir), "--host", "127.0.0.1", *flags]


def log_lines_when_there(server, wanted, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in server.log().splitlines() if wanted(line)]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


# ---- settings and --help ------------------------------------------------------------------------


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


# ---- errors found before the model loads ---------------------------------------------------------


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


# ---- the start-up log -----------------------------------------------------------------------------


def test_start_up_log_says_where_to_open_it(start_server, serving_dirs):
    server = start_server(*serving_dirs, "--max-batch-size", "2")
    log = server.log()
    assert f"open http://127.0.0.1:{server.port} (Press CTRL+C to quit)" in log
    assert "0.0.0.0" not in log
    # The weights: a line before loading, a progress bar, the time it took.
    assert log.index(LOADING) < log.index("Loading weights") < log.index("loaded OpenELM")
    assert "100%" in log
    assert " s\n" in log[log.index("loaded OpenELM") :]
    # uvicorn's normal lines read as what they are, not as errors.
    assert "uvicorn.error" not in log and "uvicorn: Application startup complete" in log


def test_where_to_open():
    assert where_to_open("127.0.0.1", 8000) == ["open http://127.0.0.1:8000 (Press CTRL+C to quit)"]
    assert where_to_open("::1", 8000) == ["open http://[::1]:8000 (Press CTRL+C to quit)"]
    lines = where_to_open("0.0.0.0", 6006)
    assert lines[0] == "open http://127.0.0.1:6006 on this machine (Press CTRL+C to quit)"
    assert "AutoDL" in lines[-1] and "6006" in lines[-1]
    assert where_to_open("::", 7000)[0].startswith("open http://[::1]:7000")
    assert not any("AutoDL" in line for line in where_to_open("0.0.0.0", 7000))


def test_access_log_gives_the_reason_of_an_error(server):
    response = requests.post(server.url, json={"prompt": 3}, timeout=30)
    assert response.status_code == 400
    request_id = response.headers["x-request-id"]
    # The access line is written once the response has gone out, so it may follow the client's read.
    access = log_lines_when_there(server, lambda line: request_id in line and "openelm_server.access" in line)
    assert len(access) == 1
    assert '"POST /" 400' in access[0] and "(prompt: Input should be a valid string)" in access[0]


def test_request_id_comes_before_the_tutorial_line(server):
    response = requests.post(server.url, json={"prompt": "where is my id?", "max_new_tokens": 2}, timeout=60)
    request_id = response.headers["x-request-id"]
    [line] = [line for line in server.log().splitlines() if "where is my id?" in line]
    assert line.index(f"[{request_id}]") < line.index('", prompt:"where is my id?"')


# ---- the demo -------------------------------------------------------------------------------------


def test_demo_serves_without_a_download(start_server, tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    server = start_server(None, None, "--demo", env=env)
    answer = requests.post(
        server.url, json={"prompt": "你好，请介绍一下你自己。", "max_new_tokens": 4}, timeout=60
    ).json()
    assert answer["status"] == 200 and answer["response"].startswith("你好，请介绍一下你自己。")
    assert requests.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"] == "OpenELM-demo"
    chat = requests.post(
        server.url + "/v1/chat/completions",
        timeout=60,
        json={"model": "OpenELM-3B-Instruct", "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 4},
    )
    assert chat.status_code == 200
    assert "demo: a tiny random-weight model" in server.log()
    demo_dir = tmp_path / "cache" / "openelm-server" / "demo"
    assert (demo_dir / "OpenELM-demo" / "model.safetensors").is_file()
    assert (demo_dir / "tokenizer" / "tokenizer.model").is_file()


def test_demo_where_nothing_can_be_written(tmp_path):
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file where the cache folder should be")
    result = run_api("--demo", "--port", str(free_port()), env={"XDG_CACHE_HOME": str(not_a_folder)})
    assert_one_error_line(result, "cannot write the demo model", "XDG_CACHE_HOME")


def test_demo_files_are_made_once(tmp_path):
    from openelm_server.demo import prepare_demo

    model_dir, tokenizer_dir = prepare_demo(tmp_path / "demo")
    made = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert prepare_demo(tmp_path / "demo") == (model_dir, tokenizer_dir)
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # nothing left from the building
