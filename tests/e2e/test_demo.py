"""``python api.py --demo``: a tiny random-weight model made once in the cache, served without a
download; a cache that cannot be written is one clear error."""

from __future__ import annotations

import requests
from cli_checks import assert_one_error_line, run_api

from openelm_server.testing.server import free_port


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
