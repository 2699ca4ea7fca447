"""Incremental detokenization and stop strings.

Llama-2's tokenizer splits many characters (most CJK text among them) into byte tokens, so a
token's text can be half a character. Text is released only once it decodes cleanly, so a
stream never shows U+FFFD where the full text has a real character, and the pieces joined
equal the text decoded in one go.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT_CHARACTER = "\ufffd"
# A window this many tokens back gives SentencePiece the context to place leading spaces.
CONTEXT_TOKENS = 6


class Tokenizer(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.token_ids = list(prompt_ids)
        self.read_offset = len(self.token_ids)
        self.prefix_offset = max(self.read_offset - CONTEXT_TOKENS, 0)

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """The new text that ``token_id`` completes; empty while a character is unfinished."""
        self.token_ids.append(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        """Whatever is still held back, at the end of the sequence."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset :])
        if len(full_text) <= len(prefix_text) or (full_text.endswith(REPLACEMENT_CHARACTER) and not final):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return full_text[len(prefix_text) :]


class StopStringMatcher:
    """Finds stop strings in the generated text, and holds back text that may start one.

    The text is kept whole so that a stop string spanning several tokens is found; what is
    released never includes any part of a stop string.
    """

    def __init__(self, stop: tuple[str, ...]):
        self.stop = tuple(s for s in stop if s)
        self.text = ""
        self.released = 0
        self.stopped = False

    def add(self, piece: str, may_stop: bool = True) -> str:
        """Add generated text; return the part that is safe to show now. While ``may_stop`` is
        false (an answer still short of its min_tokens) stop strings are let through."""
        if self.stopped:
            return ""
        search_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += piece
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits and may_stop:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self._release(len(self.text))
        return self._release(len(self.text) - self._partial_stop_length())

    def finish(self) -> str:
        return self._release(len(self.text))

    def _partial_stop_length(self) -> int:
        """Length of the longest end of the text that is the beginning of a stop string."""
        longest = 0
        for stop_string in self.stop:
            for length in range(min(len(stop_string) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop_string[:length]):
                    longest = length
                    break
        return longest

    def _release(self, end: int) -> str:
        end = max(end, self.released)
        piece = self.text[self.released : end]
        self.released = end
        return piece
