"""The draft model is prepared as the flags ask for the model: ``--quantization int8`` makes its
linear layers int8 too, ``--cpu-linear`` gives it the kernel forced, and the default times the kernels
on its own shapes. Greedy answers stay the model's whatever the draft holds."""

from __future__ import annotations

import logging

import pytest
from engine_helpers import greedy, reference, run_together
from torch import nn

from openelm_server.config import Settings
from openelm_server.model.cpu_linear import OneDnnLinear, PanelLinear
from openelm_server.model.quantize import Int8Linear
from openelm_server.startup import build_engine


def settings(model_dir, tokenizer_dir, speculative: str, **fields) -> Settings:
    return Settings(
        model_path=str(model_dir),
        tokenizer_path=str(tokenizer_dir),
        draft_model_path=str(model_dir) if speculative == "draft" else None,
        speculative=speculative,
        device="cpu",
        max_batch_size=4,
        max_model_len=256,
        **fields,
    )


def linear_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, Int8Linear, OneDnnLinear, PanelLinear))]


def test_an_int8_server_drafts_with_int8_layers_and_answers_as_without_a_draft(
    caplog, shared_model_dir, shared_tokenizer_dir
):
    ref = reference(shared_model_dir)
    jobs = [(case["prompt_ids"], greedy(ref["new_tokens"])) for case in ref["cases"]]
    answers = {}
    for speculative in ("none", "draft"):
        with caplog.at_level(logging.INFO):
            engine, _ = build_engine(settings(shared_model_dir, shared_tokenizer_dir, speculative, quantization="int8"))
        engine.start()
        try:
            if speculative == "draft":
                draft = engine.core.draft_proposer.model
                assert all(isinstance(layer, Int8Linear) for layer in linear_layers(draft))
                assert isinstance(draft.lm_head, Int8Linear)
            answers[speculative] = run_together(engine, jobs)
        finally:
            engine.shutdown()
    assert "draft model: linear layers and the output layer in int8" in caplog.text
    assert answers["draft"] == answers["none"]


@pytest.mark.parametrize("cpu_linear", ["onednn", "auto"], ids=["forced", "timed"])
def test_the_draft_gets_the_linear_kernels_of_its_own(caplog, shared_model_dir, shared_tokenizer_dir, cpu_linear):
    with caplog.at_level(logging.INFO):
        engine, _ = build_engine(settings(shared_model_dir, shared_tokenizer_dir, "draft", cpu_linear=cpu_linear))
    draft = engine.core.draft_proposer.model
    kinds = {type(layer).__name__ for layer in linear_layers(draft)}
    if cpu_linear == "onednn":
        assert kinds == {"OneDnnLinear"}
        assert "draft model: linear layers run oneDNN's kernel, as --cpu-linear onednn asks" in caplog.text
    else:
        assert len(kinds) == 1  # whichever was faster here, for every layer
        assert "draft model: linear kernels timed on this CPU" in caplog.text
