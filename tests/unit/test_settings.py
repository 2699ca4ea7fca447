"""Settings from flags and their environment twins."""

from __future__ import annotations

import pytest


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


def test_speculative_decoding_settings():
    from openelm_server.config import load_settings

    defaults = load_settings([], {})
    assert (defaults.speculative, defaults.num_speculative_tokens) == ("none", 4)
    settings = load_settings(["--num-speculative-tokens", "7"], {"SPECULATIVE": "ngram", "NUM_SPECULATIVE_TOKENS": "2"})
    assert (settings.speculative, settings.num_speculative_tokens) == ("ngram", 7)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--speculative", "medusa"], "--speculative must be none or ngram, got 'medusa'"),
        (["--num-speculative-tokens", "0"], "--num-speculative-tokens: must be from 1 to 16, got 0"),
        (["--num-speculative-tokens", "17"], "--num-speculative-tokens: must be from 1 to 16, got 17"),
    ],
)
def test_bad_speculative_settings_are_refused(argv, message, capsys):
    from openelm_server.config import load_settings

    with pytest.raises(SystemExit) as exit_info:
        load_settings(argv, {})
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
