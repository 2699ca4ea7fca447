"""The engine's settings. Their defaults are the server's: config.Settings takes each engine field's
default from here, and startup builds this from Settings field by field."""

from __future__ import annotations

from dataclasses import dataclass

# Tokens one step computes by default, per device. A running stream pauses for one step while a
# prompt is read, so a step must stay short: on the CPU 256 tokens read a 1,500-token prompt in 6
# steps (512 took 3, and the streams paused for a third of its time to first token; BENCHMARKS.md).
# On an H200 (3B, bfloat16, graph pieces) a step costs ~10 ms of fixed overhead up to ~512 tokens
# and then grows with them: 4 decodes + 60 prompt tokens 10.5 ms, + 508 11.9 ms, + 2,040 42 ms.
# 512 reads prompts as fast as 2,048 did (43k against 48k tokens/s) in steps a quarter as long.
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cpu": 256, "cuda": 512}

SPECULATIVE_METHODS = ("none", "ngram", "draft")
MAX_SPECULATIVE_TOKENS = 16


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32  # requests running (decoding or reading their prompt) at once
    max_model_len: int = 2048  # tokens per sequence, prompt included
    max_queue: int = 256  # requests allowed to wait
    # Tokens the KV cache holds, all requests together; None: max_batch_size * max_model_len
    # (start-up fits it to the machine's memory).
    kv_cache_tokens: int | None = None
    # Tokens computed per step (decodes plus prompt chunks); None: per device, see above.
    max_num_batched_tokens: int | None = None
    prefix_caching: bool = True  # reuse the KV blocks of a prompt's prefix that was seen before
    cuda_graphs: bool = True  # on CUDA: decode steps, and other steps around attention, as CUDA graphs
    # Speculative decoding of greedy requests: "none", "ngram" (proposals looked up in the
    # request's own tokens) or "draft" (proposed by a smaller model given to the engine); the
    # model verifies up to num_speculative_tokens proposals per step.
    speculative: str = "none"
    num_speculative_tokens: int = 4

    def __post_init__(self) -> None:
        if self.speculative not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative must be one of {', '.join(SPECULATIVE_METHODS)}, got {self.speculative!r}")
        if not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(
                f"num_speculative_tokens must be from 1 to {MAX_SPECULATIVE_TOKENS}, got {self.num_speculative_tokens}"
            )

    @property
    def resolved_kv_cache_tokens(self) -> int:
        return self.kv_cache_tokens or self.max_batch_size * self.max_model_len

    def resolved_max_num_batched_tokens(self, device_type: str) -> int:
        return self.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS.get(device_type, 512)
