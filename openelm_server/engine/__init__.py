"""The generation engine: requests, scheduling, batched forwards, sampling and output. Knows nothing of HTTP."""
