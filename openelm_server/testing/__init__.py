"""Random checkpoints, tokenizers and published configurations for tests, benchmarks and the demo."""
