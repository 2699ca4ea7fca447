"""Structured output: answers constrained to a JSON schema by llguidance's grammar matcher.

At each step the matcher says which tokens may come next; the others are masked out of the
logits before sampling, so the answer always parses (unless max_tokens cuts it short). JSON is
kept compact (no free whitespace): a model may otherwise pad an answer with blanks forever.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import llguidance
import llguidance.hf
import llguidance.torch
import torch

# The grammar of "any JSON object", for response_format json_object.
ANY_OBJECT_SCHEMA = json.dumps({"type": "object"})


@dataclass(frozen=True)
class OutputConstraint:
    """What an answer must be: JSON valid against ``json_schema`` (a schema as JSON text)."""

    json_schema: str

    def _grammar(self) -> str:
        return llguidance.LLMatcher.grammar_from_json_schema(self.json_schema, defaults={"whitespace_flexible": False})

    def problem(self) -> str | None:
        """Why the schema cannot be followed (unknown keywords, bad types), or None."""
        return llguidance.LLMatcher.validate_grammar(self._grammar()) or None


class Grammars:
    """Matchers for one tokenizer. The tokenizer's token table is built once, on first use
    (about a second for Llama-2's 32,000 tokens), so servers that never constrain pay nothing."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._token_table: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def _table(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._token_table is None:
                self._token_table = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size)
            return self._token_table

    def matcher(self, constraint: OutputConstraint) -> ConstrainedDecoding:
        """A fresh matcher; ValueError when the schema is not one llguidance can follow."""
        problem = constraint.problem()
        if problem:
            raise ValueError(f"the JSON schema cannot be followed: {problem}")
        return ConstrainedDecoding(llguidance.LLMatcher(self._table(), constraint._grammar()), self.vocab_size)


class ConstrainedDecoding:
    """One answer's matcher: masks the logits of tokens the grammar forbids, follows the
    tokens chosen, and says when the answer is complete."""

    BIT_POSITIONS = torch.arange(32, dtype=torch.int32)

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self.matcher = matcher
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: torch.Tensor) -> None:
        """Forbidden tokens to -inf in ``logits`` (one row, on the CPU or a GPU). The bitmask
        (32 tokens per int32 word) is unpacked here in plain torch: llguidance's own kernel
        needs torch.compile, which some machines cannot run."""
        llguidance.torch.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        bits = (self.bitmask[0].unsqueeze(1) >> self.BIT_POSITIONS) & 1
        allowed = bits.flatten()[: logits.numel()].bool()
        logits.masked_fill_(~allowed.to(logits.device), float("-inf"))

    def accept(self, token_id: int) -> None:
        self.matcher.consume_token(token_id)

    @property
    def complete(self) -> bool:
        """The answer is whole (EOS taken, or nothing more can follow)."""
        return self.matcher.is_stopped()
