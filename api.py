"""Serve OpenELM-3B-Instruct over HTTP.

    pip install -r requirements.txt
    bash download.sh && python api.py

``python api.py --help`` lists every setting. See README.md.
"""

from __future__ import annotations

import logging
import signal
import sys

import uvicorn

from openelm_server.app import create_app
from openelm_server.middleware import RequestIdFilter
from openelm_server.settings import Settings, load_settings
from openelm_server.startup import STARTUP_ERRORS, build_engine

log = logging.getLogger("openelm_server")


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)


def main(settings: Settings) -> int:
    configure_logging(settings.log_level)
    # uvicorn drains requests on SIGTERM/SIGINT, then raises the signal again for the handler
    # it found; ours makes that a clean exit (status 0) instead of death by signal.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, exit_cleanly)
    try:
        engine, tokenizer = build_engine(settings)
        app = create_app(settings, engine, tokenizer)
    except STARTUP_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if settings.host == "0.0.0.0" and not settings.api_key:
        log.warning("listening on 0.0.0.0 without an API key: anyone who reaches port %d can use this server; "
                    "set --api-key / API_KEY", settings.port)
    log.info("serving %s on http://%s:%d", settings.model_name, settings.host, settings.port)
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                timeout_graceful_shutdown=settings.shutdown_timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main(load_settings()))
