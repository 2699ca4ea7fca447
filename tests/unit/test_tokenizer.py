"""Loading the Llama-2-style tokenizer: a clear error without tokenizer.model; BOS added, text round-trips."""

from __future__ import annotations

import pytest

from openelm_server.tokenizer import TokenizerError, load_tokenizer


def test_tokenizer_directory_without_model_file(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.model"):
        load_tokenizer(tmp_path)


def test_own_tokenizer_adds_bos_and_round_trips(own_tokenizer_dir):
    tokenizer = load_tokenizer(own_tokenizer_dir)
    ids = tokenizer("你好 world").input_ids
    assert ids[0] == tokenizer.bos_token_id == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == "你好 world"
