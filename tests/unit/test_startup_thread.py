"""The model is built on a thread that has ended before the engine runs (startup.in_passing_thread).

OpenMP gives each thread that uses it a worker pool of its own; a model built on the main thread
leaves a second pool beside the engine thread's, and libgomp then sleeps its idle workers after
every kernel (bench/threads.py measures the cost). These tests hold the arrangement in place.
"""

from __future__ import annotations

import threading

import pytest

from openelm_server import startup
from openelm_server.config import Settings
from openelm_server.startup import StartupError, build_engine, in_passing_thread


def test_the_model_is_loaded_off_the_main_thread_on_a_thread_that_then_ends(
    monkeypatch, own_model_dir, own_tokenizer_dir
):
    loaded_on: list[threading.Thread] = []
    real_load = startup.load_openelm

    def load(*args, **kwargs):
        loaded_on.append(threading.current_thread())
        return real_load(*args, **kwargs)

    monkeypatch.setattr(startup, "load_openelm", load)
    settings = Settings(model_path=str(own_model_dir), tokenizer_path=str(own_tokenizer_dir), device="cpu")
    engine, _ = build_engine(settings)
    engine.start()
    engine.shutdown()
    [thread] = loaded_on
    assert thread is not threading.main_thread()
    assert not thread.is_alive()


def test_in_passing_thread_returns_the_result_and_raises_the_error_on_the_caller():
    assert in_passing_thread(lambda a, b: (a + b, threading.current_thread().name), 2, 3) == (5, "startup")

    def fail():
        raise StartupError("no model here")

    with pytest.raises(StartupError, match="no model here"):
        in_passing_thread(fail)


def test_a_startup_error_from_the_build_still_reaches_the_caller(tmp_path, own_tokenizer_dir):
    settings = Settings(model_path=str(tmp_path / "missing"), tokenizer_path=str(own_tokenizer_dir), device="cpu")
    with pytest.raises(startup.STARTUP_ERRORS):
        build_engine(settings)
