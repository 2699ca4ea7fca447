"""What ``python api.py`` logs as it starts: loading with progress and time, the device and dtype
it chose, an address to open, and a warning when it listens everywhere without a key."""

from __future__ import annotations

import pytest

LOADING = "loading OpenELM from"


API_KEY = "s3cret-key-0123456789"


@pytest.fixture(scope="module")
def servers(start_server, serving_dirs):
    """Started in parallel: on 127.0.0.1, and on all interfaces without and with a key."""
    flags = ("--max-batch-size", "2")
    everywhere = ("--host", "0.0.0.0", *flags)
    started = {
        "local": start_server(*serving_dirs, *flags, env={"API_KEY": ""}, wait=False),
        "open": start_server(*serving_dirs, *everywhere, env={"API_KEY": ""}, wait=False),
        "key": start_server(*serving_dirs, *everywhere, "--api-key", API_KEY, env={"API_KEY": ""}, wait=False),
    }
    for server in started.values():
        server.wait_ready(timeout=180)
    return started


def test_start_up_log_says_where_to_open_it(servers):
    server = servers["local"]
    log = server.log()
    assert f"open http://127.0.0.1:{server.port} (Press CTRL+C to quit)" in log
    assert "0.0.0.0" not in log
    # The weights: a line before loading, a progress bar, the time it took.
    assert log.index(LOADING) < log.index("Loading weights") < log.index("loaded OpenELM")
    assert "100%" in log
    assert " s\n" in log[log.index("loaded OpenELM") :]
    # uvicorn's normal lines read as what they are, not as errors.
    assert "uvicorn.error" not in log and "uvicorn: Application startup complete" in log


def test_auto_device_and_dtype_on_this_machine(servers):
    import torch

    log = servers["local"].log()
    if torch.cuda.is_available():
        assert "device auto: CUDA" in log and "bfloat16" in log
    else:
        assert "device auto: no CUDA GPU found, using the CPU" in log and "in float32" in log
    assert "KV cache: 4096 tokens" in log  # 2 x the context of 2048


def test_warning_when_listening_on_all_interfaces_without_a_key(servers):
    assert "without an API key" in servers["open"].log()
    assert "without an API key" not in servers["key"].log()  # also on 0.0.0.0, but with a key
