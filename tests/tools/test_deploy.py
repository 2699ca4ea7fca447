"""deploy/: the Dockerfile and the systemd unit, checked statically (no Docker daemon or
systemd instance is needed): the keys a long-running deployment relies on are there and agree
with the server's settings."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess

import pytest
from conftest import ROOT

from openelm_server.config import Settings

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
UNIT = ROOT / "deploy" / "openelm-server.service"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            instructions.append((keyword.upper(), " ".join(arguments.split())))
    return instructions


def dockerfile_env(instructions) -> dict[str, str]:
    env = {}
    for keyword, arguments in instructions:
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(arguments))
    return env


def unit_sections() -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
        else:
            key, _, value = line.partition("=")
            current.append((key, value))
    return sections


def test_dockerfile_runs_the_server_as_a_user_on_a_cuda_image():
    instructions = dockerfile_instructions()
    keywords = [k for k, _ in instructions]
    assert instructions[0][0] == "FROM" and instructions[0][1].startswith("nvidia/cuda:")
    user = [args for k, args in instructions if k == "USER"]
    assert user and user[-1] not in ("root", "0")
    # Everything that installs runs before the switch to the user; the server after it.
    assert max(i for i, k in enumerate(keywords) if k == "RUN") < keywords.index("USER") < keywords.index("CMD")
    assert any(k == "RUN" and "pip install" in args and "-r requirements.txt" in args for k, args in instructions)
    assert dict(instructions)["CMD"] == '["python", "api.py"]'


def test_dockerfile_copies_only_what_exists():
    for keyword, arguments in dockerfile_instructions():
        if keyword == "COPY":
            *sources, _ = arguments.split()
            for source in sources:
                assert (ROOT / source).exists(), source


def test_dockerfile_model_volume_health_check_and_port():
    instructions = dockerfile_instructions()
    volumes = [args for k, args in instructions if k == "VOLUME"]
    assert volumes == ["/models"]
    env = dockerfile_env(instructions)
    assert env["MODEL_PATH"].startswith("/models/") and env["TOKENIZER_PATH"].startswith("/models/")
    assert env["HOST"] == "0.0.0.0"
    [expose] = [args for k, args in instructions if k == "EXPOSE"]
    assert expose == env["PORT"] == str(Settings().port)
    [health] = [args for k, args in instructions if k == "HEALTHCHECK"]
    assert "/health" in health and "${PORT}" in health and "--start-period=" in health
    assert dict(instructions)["STOPSIGNAL"] == "SIGTERM"


def test_systemd_unit_has_what_a_long_running_service_needs():
    sections = unit_sections()
    assert set(sections) == {"Unit", "Service", "Install"}
    service = dict(sections["Service"])
    assert service["ExecStart"].endswith("python api.py")
    assert service["User"] not in ("root", "0")
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    # The stop timeout leaves room for the server's own graceful shutdown.
    assert int(service["TimeoutStopSec"]) > Settings().shutdown_timeout
    environment = dict(value.split("=", 1) for key, value in sections["Service"] if key == "Environment")
    assert {"MODEL_PATH", "TOKENIZER_PATH", "HOST", "PORT"} <= set(environment)
    assert environment["PORT"] == str(Settings().port)
    assert dict(sections["Install"])["WantedBy"] == "multi-user.target"
    assert "StartLimitBurst" in dict(sections["Unit"])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_every_key(tmp_path):
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text())
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # The paths of an installation on this machine do not exist; anything else is a mistake in the unit.
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.strip() and "is not executable: No such file or directory" not in line
    ]
    assert problems == []
