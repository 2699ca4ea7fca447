"""The engine's settings. Their defaults are the server's: config.Settings takes each engine field's
default from here, and startup builds this from Settings field by field."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32  # sequences decoded together (KV-cache slots)
    max_model_len: int = 2048  # tokens per sequence, prompt included
    max_queue: int = 256  # requests allowed to wait
    max_prefill_tokens: int = 4096  # prompt tokens (padded) prefilled in one step
    cuda_graphs: bool = True  # decode steps replayed as CUDA graphs on CUDA
