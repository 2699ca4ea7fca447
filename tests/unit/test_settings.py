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
        (["--speculative", "medusa"], "--speculative must be none, ngram or draft, got 'medusa'"),
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


def test_a_draft_model_path_implies_draft_speculation():
    from openelm_server.config import load_settings

    settings = load_settings([], {"DRAFT_MODEL_PATH": "/m/OpenELM-270M-Instruct"})
    assert (settings.speculative, settings.draft_model_path) == ("draft", "/m/OpenELM-270M-Instruct")
    settings = load_settings(["--speculative", "draft", "--draft-model-path", "/d"], {})
    assert (settings.speculative, settings.draft_model_path) == ("draft", "/d")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--speculative", "draft"], "--speculative draft needs the draft model's directory: pass --draft-model-path"),
        (["--speculative", "ngram", "--draft-model-path", "/d"], "--draft-model-path is for --speculative draft"),
    ],
)
def test_draft_settings_that_do_not_go_together_are_refused(argv, message, capsys):
    from openelm_server.config import load_settings

    with pytest.raises(SystemExit):
        load_settings(argv, {})
    assert message in capsys.readouterr().err
