"""``python api.py`` run to its end, as a user types it, and what a refused start-up prints."""

from __future__ import annotations

import os
import subprocess
import sys

from openelm_server.testing.server import ROOT


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
