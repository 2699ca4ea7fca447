"""A server in a subprocess on 127.0.0.1, for the tests and the benchmarks: ours (``python api.py``, as
a user starts it) or any other command that serves HTTP with a ``/health`` route.

Its output goes to a log file, which errors quote; ``stop()`` sends SIGTERM (or the signal given),
then SIGKILL after the timeout.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, command: Sequence[str], port: int, log_path: str | Path, env: dict | None = None):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.command = list(command)
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w+")
        self.process = subprocess.Popen(
            self.command, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    @classmethod
    def openelm(
        cls,
        model_dir: str | Path | None,
        tokenizer_dir: str | Path | None,
        flags: Sequence[str] = (),
        log_path: str | Path | None = None,
        env: dict | None = None,
    ) -> ServerProcess:
        """``python api.py`` on a free port; no directories: the server's own (the defaults, or --demo's)."""
        port = free_port()
        paths = [] if model_dir is None else ["--model-path", str(model_dir), "--tokenizer-path", str(tokenizer_dir)]
        command = [sys.executable, str(ROOT / "api.py"), *paths, "--host", "127.0.0.1", "--port", str(port), *flags]
        log_path = log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"openelm-server-{port}.log"
        return cls(command, port, log_path, env)

    def wait_ready(self, timeout: float = 300.0) -> ServerProcess:
        """Until ``/health`` answers 200; an exit or the timeout raises with the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(self.url + "/health", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log(self) -> str:
        self._log.flush()
        with contextlib.suppress(OSError):
            return self.log_path.read_text()
        return ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log()[-chars:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self._log.closed:
            self._log.close()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
