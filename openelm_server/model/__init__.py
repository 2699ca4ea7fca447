"""OpenELM itself: configuration, layers, checkpoint loading, KV cache and CPU kernels."""
