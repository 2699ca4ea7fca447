"""Settings from flags and their environment twins."""

from __future__ import annotations

from pathlib import Path

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


def test_tokens_per_step_default_per_device_as_the_readme_says():
    """A step holds 256 tokens on the CPU and 512 on CUDA unless --max-num-batched-tokens says
    otherwise (README's flags table; engine/config.py says why)."""
    from openelm_server.engine.config import EngineConfig

    assert EngineConfig().resolved_max_num_batched_tokens("cpu") == 256
    assert EngineConfig().resolved_max_num_batched_tokens("cuda") == 512
    assert EngineConfig(max_num_batched_tokens=2048).resolved_max_num_batched_tokens("cuda") == 2048
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert "| `--max-num-batched-tokens` | `MAX_NUM_BATCHED_TOKENS` | 256 CPU, 512 CUDA |" in readme
