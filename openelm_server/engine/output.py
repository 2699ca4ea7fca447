"""What a request's client sees: its generated tokens turned into text and events.

The engine core deals in tokens; this builds the text outside it: incremental detokenization,
stop strings, and the :class:`GenerationEvent` each step sends. A stop string found here ends
the request in the core before its next step.

Llama-2's tokenizer splits many characters (most CJK text among them) into byte tokens, so a
token's text can be half a character. Text is released only once it decodes cleanly, so a
stream never shows U+FFFD where the full text has a real character, and the pieces joined
equal the text decoded in one go.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from openelm_server.engine.logprobs import TokenLogprob
from openelm_server.engine.request import FinishReason
from openelm_server.engine.sampling import SamplingParams

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


class EngineError(Exception):
    """A generation failed inside the engine; ``retryable`` failures (out of memory, shutting
    down) may succeed if sent again."""

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class GenerationEvent:
    """What one step did for one request: new text, new tokens, and whether it is over.

    ``logprobs`` has one entry per token of ``token_ids`` when the request asked for them;
    ``prompt_logprobs`` comes with the first event when asked (None for the first prompt token,
    which has no context)."""

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    error: EngineError | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    # Speculative decoding so far: tokens proposed for the request, and of them the ones confirmed.
    draft_tokens: int = 0
    accepted_tokens: int = 0


@dataclass(frozen=True)
class RequestOutput:
    """What the engine core produced for one request in one step: one token, none (an echo of
    the prompt) or, when it speculates, several."""

    request_id: str
    token_ids: tuple[int, ...]
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    draft_tokens: int = 0  # speculative decoding so far, as in GenerationEvent
    accepted_tokens: int = 0


class OutputBuilder:
    """One request's text so far; turns each :class:`RequestOutput` into its event."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams, eos_token_id: int):
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stop_matcher = StopStringMatcher(params.stop)
        self.params = params
        self.eos_token_id = eos_token_id

    @property
    def stopped(self) -> bool:
        """A stop string ended the answer: the core must finish the request."""
        return self.stop_matcher.stopped

    def build(self, output: RequestOutput) -> GenerationEvent:
        """The event of one step's tokens. A stop string ends the answer at the token that
        completes it: tokens after it in the same step (speculative decoding) are dropped, and
        counted as never generated."""
        matcher = self.stop_matcher
        ending = output.finish_reason is not None
        text = ""
        token_ids = output.token_ids
        # The answer's length before this step's tokens.
        done = output.num_output_tokens - len(token_ids)
        for i, token in enumerate(token_ids):
            if token == self.eos_token_id and not self.params.ignore_eos:
                text += matcher.add(self.detokenizer.flush())  # EOS itself has no text
            else:
                text += matcher.add(self.detokenizer.push(token), done + i + 1 >= self.params.min_tokens)
                if ending and i == len(token_ids) - 1 and not matcher.stopped:
                    text += matcher.add(self.detokenizer.flush())
            if matcher.stopped:
                token_ids = token_ids[: i + 1]
                break
        reason = FinishReason.STOP if matcher.stopped else output.finish_reason
        if reason is not None:
            text += matcher.finish()
        return GenerationEvent(
            text,
            token_ids,
            output.num_prompt_tokens,
            done + len(token_ids),
            None if reason is None else reason.value,
            logprobs=output.logprobs[: len(token_ids)],
            prompt_logprobs=output.prompt_logprobs,
            draft_tokens=output.draft_tokens,
            accepted_tokens=output.accepted_tokens,
        )
