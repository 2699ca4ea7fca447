"""The incremental detokenizer with the real Llama-2 tokenizer, directly: random weights seldom
generate the byte tokens that make CJK text and emoji hard."""

from __future__ import annotations

import random

import pytest
from openai_helpers import REPLACEMENT, assert_clean_pieces

from openelm_server.engine.output import IncrementalDetokenizer


def detokenize_stepwise(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    pieces = [detokenizer.push(token) for token in new_ids]
    pieces.append(detokenizer.flush())
    return pieces


def test_detokenizer_holds_back_byte_tokens_of_chinese(llama_tokenizer):
    text = "你好，请介绍一下你自己。绍"
    ids = llama_tokenizer(text).input_ids
    tokens = llama_tokenizer.convert_ids_to_tokens(ids)
    assert ["<0xE7>", "<0xBB>", "<0x8D>"] == tokens[-3:], tokens  # 绍 is three byte tokens
    pieces = detokenize_stepwise(llama_tokenizer, ids[:1], ids[1:])
    assert not [p for p in pieces if REPLACEMENT in p], pieces
    assert "".join(pieces) == llama_tokenizer.decode(ids, skip_special_tokens=True) == text
    assert pieces[-4:] == ["", "", "绍", ""]
    # Pushed from nothing (BOS included) it is the same.
    assert "".join(detokenize_stepwise(llama_tokenizer, [], ids)) == text


@pytest.mark.parametrize("prompt", ["", "Once upon a time", "你好，", "Hi 😀"])
def test_detokenizer_continuation_after_a_prompt(llama_tokenizer, prompt):
    """After a prompt, the pieces are exactly what decoding prompt + continuation adds to the
    prompt's text (leading spaces included), and never show half a character."""
    prompt_ids = llama_tokenizer(prompt).input_ids
    for continuation in (" world 绍兴 😀 ok", "绍兴是一个美丽的城市。", " café ß €", "\n\tdef f():\n    return 1"):
        new_ids = llama_tokenizer(prompt + continuation).input_ids[len(prompt_ids) :]
        whole = llama_tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
        prompt_text = llama_tokenizer.decode(prompt_ids, skip_special_tokens=True)
        assert whole.startswith(prompt_text)
        pieces = detokenize_stepwise(llama_tokenizer, prompt_ids, new_ids)
        assert_clean_pieces(pieces, whole[len(prompt_text) :])


def test_detokenizer_random_mixtures(llama_tokenizer):
    rng = random.Random(1234)
    vocabulary = ["绍", "兴", "你好", "😀", "🦊", " the", " fox", "，", "。", "é", " ", "\n", "Ω", "語", "𝔘", "12"]
    prompt_ids = llama_tokenizer("Hello:").input_ids
    prompt_text = llama_tokenizer.decode(prompt_ids, skip_special_tokens=True)
    for _ in range(30):
        text = "".join(rng.choice(vocabulary) for _ in range(rng.randint(1, 12)))
        new_ids = llama_tokenizer("Hello:" + text).input_ids[len(prompt_ids) :]
        whole = llama_tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
        pieces = detokenize_stepwise(llama_tokenizer, prompt_ids, new_ids)
        assert_clean_pieces(pieces, whole[len(prompt_text) :])


def test_detokenizer_invalid_bytes_still_join_to_the_whole_text(llama_tokenizer):
    """Stray byte tokens (as random weights make) never form a character: the pieces still
    join into the text decoded in one go."""
    byte = {
        f"<0x{b:02X}>": i for i, b in ((llama_tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>"), b) for b in range(256))
    }
    prompt_ids = llama_tokenizer("x").input_ids
    world = llama_tokenizer(" world").input_ids[1:]
    sequences = [
        [byte["<0xE7>"]] + world,
        [byte["<0xE7>"], byte["<0xBB>"]],
        world + [byte["<0x8D>"]] + world,
        [byte["<0xF0>"], byte["<0x9F>"], byte["<0xE7>"], byte["<0xBB>"], byte["<0x8D>"]],
    ]
    for new_ids in sequences:
        whole = llama_tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
        pieces = detokenize_stepwise(llama_tokenizer, prompt_ids, new_ids)
        assert "".join(pieces) == whole[len("x") :], (pieces, whole)


def test_detokenizer_skips_special_tokens(llama_tokenizer):
    prompt_ids = llama_tokenizer("Hi").input_ids
    new_ids = llama_tokenizer(" there").input_ids[1:] + [llama_tokenizer.eos_token_id]
    pieces = detokenize_stepwise(llama_tokenizer, prompt_ids, new_ids)
    assert "".join(pieces) == " there"
