"""The Llama-2 tokenizer OpenELM was trained with, loaded as the original tutorial did."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase


class TokenizerError(ValueError):
    pass


def load_tokenizer(tokenizer_dir: str | Path) -> PreTrainedTokenizerBase:
    """The SentencePiece (slow) tokenizer; it adds BOS, as OpenELM's published usage requires."""
    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.model").is_file():
        raise TokenizerError(f"{tokenizer_dir}: no tokenizer.model; is this the Llama-2 tokenizer directory?")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), use_fast=False)
    except Exception as error:  # transformers raises many kinds for a broken directory; each is a user error here
        raise TokenizerError(
            f"{tokenizer_dir}: cannot load the tokenizer ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no details'})"
        ) from error
    if not tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]:
        raise TokenizerError(
            f"{tokenizer_dir}: the tokenizer does not add BOS; set add_bos_token in tokenizer_config.json"
        )
    return tokenizer
