"""Serve OpenELM-3B-Instruct over HTTP.

    pip install -r requirements.txt
    bash download.sh && python api.py

``python api.py --help`` lists every setting; ``python api.py --demo`` serves a tiny
random-weight model without the download. See README.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys

import uvicorn

from openelm_server.config import Settings, load_settings
from openelm_server.listen import bind_socket, where_to_open

log = logging.getLogger("openelm_server")


class UvicornLoggerName(logging.Filter):
    """uvicorn logs its normal start-up and shutdown lines as ``uvicorn.error``, which reads
    like trouble; they are shown as ``uvicorn``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.error":
            record.name = "uvicorn"
        return True


def log_handler(stream) -> logging.Handler:
    """The server's log lines: time, level, [request id], logger, message. (The in-process test
    servers write theirs with it too.)"""
    from openelm_server.serving.middleware import RequestIdFilter

    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.addFilter(UvicornLoggerName())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"))
    return handler


def configure_logging(level: str) -> None:
    root = logging.getLogger()
    root.handlers[:] = [log_handler(sys.stdout)]
    root.setLevel(level.upper())


def uvicorn_config(app, settings: Settings) -> uvicorn.Config:
    # The event loop and HTTP parser that requirements.txt installs and the tests run, also where
    # uvloop or httptools happen to be installed (Ray Serve brings both), which uvicorn would pick.
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=settings.shutdown_timeout,
        loop="asyncio",
        http="h11",
    )


class Server(uvicorn.Server):
    """uvicorn's server on the socket bound before loading; once it listens, it says which
    address to open (uvicorn itself would print the unopenable http://0.0.0.0:6006).

    On a stop signal uvicorn lets running requests finish for --shutdown-timeout seconds, then
    cancels them, and a cancelled request's client gets a bare "500 Internal Server Error". So a
    second before that, the engine ends what is still running with its retryable "the server is
    shutting down", which the handlers send as a JSON 503 (or as a stream's last event)."""

    # Time left for the handlers to answer once the engine has ended their requests.
    ANSWER_SECONDS = 1.0

    def __init__(self, config: uvicorn.Config, settings: Settings, engine):
        super().__init__(config)
        self.settings = settings
        self.engine = engine

    async def shutdown(self, sockets=None) -> None:
        loop = asyncio.get_running_loop()
        delay = max(self.settings.shutdown_timeout - self.ANSWER_SECONDS, 0.0)
        # In a worker thread: shutting the engine down waits for its step to end.
        timer = loop.call_later(delay, lambda: loop.run_in_executor(None, self.engine.shutdown))
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        log.info("serving %s", self.settings.model_name)
        for line in where_to_open(self.settings.host, self.settings.port):
            log.info("%s", line)


def exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)


def main(settings: Settings) -> int:
    # Imported only now, so that --help and a bad flag answer at once instead of after the
    # seconds it takes to import torch and transformers.
    from openelm_server.demo import prepare_demo
    from openelm_server.serving.app import create_app
    from openelm_server.startup import STARTUP_ERRORS, build_engine

    configure_logging(settings.log_level)
    # uvicorn drains requests on SIGTERM/SIGINT, then raises the signal again for the handler
    # it found; ours makes that a clean exit (status 0) instead of death by signal.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, exit_cleanly)
    try:
        if settings.demo:
            model_dir, tokenizer_dir = prepare_demo()
            log.info("demo: a tiny random-weight model (its answers are gibberish) from %s", model_dir.parent)
            settings = dataclasses.replace(settings, model_path=str(model_dir), tokenizer_path=str(tokenizer_dir))
        # The port is taken before the model loads, so that a busy port is reported at once.
        sock = bind_socket(settings.host, settings.port)
        engine, tokenizer = build_engine(settings)
        app = create_app(settings, engine, tokenizer)
    except STARTUP_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if settings.host == "0.0.0.0" and not settings.api_key:
        log.warning(
            "listening on 0.0.0.0 without an API key: anyone who reaches port %d can use this server; "
            "set --api-key / API_KEY",
            settings.port,
        )

    Server(uvicorn_config(app, settings), settings, engine).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main(load_settings()))
