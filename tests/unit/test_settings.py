"""Settings from flags and their environment twins."""

from __future__ import annotations


def test_settings_from_environment_and_flags():
    from openelm_server.config import load_settings

    settings = load_settings(
        ["--port", "7000"],
        {"PORT": "8000", "MODEL_PATH": "/m/OpenELM-3B-Instruct", "DEVICE": "cpu", "LOG_PROMPTS": "0"},
    )
    assert settings.port == 7000 and settings.device == "cpu" and not settings.log_prompts
    assert settings.model_name == "OpenELM-3B-Instruct"
    defaults = load_settings([], {})
    assert (defaults.host, defaults.port, defaults.device, defaults.dtype) == ("0.0.0.0", 6006, "auto", "auto")
