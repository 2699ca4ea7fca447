"""Memory bandwidth of this machine, measured with torch, and the decode roofline it implies.

    python -m bench.bandwidth                # CPU, 1 GiB buffers
    python -m bench.bandwidth --device cuda  # GPU

Three measurements, best of ``--repeats`` (the least disturbed by other processes):

* ``read``: ``x.sum()`` over a buffer far larger than any cache; bytes = the buffer.
* ``copy``: ``y.copy_(x)``; bytes = read + write, as STREAM counts them.
* ``gemv``: ``F.linear(v, W)`` with one input row, the very operation of single-stream decode;
  bytes = the weight matrix.

Single-stream decode must read every weight once per token (the tied embedding matrix
included, for the logits), so ``max tokens/s = read bandwidth / weight bytes``: the roofline.
The KV cache adds a little more per token; at the short contexts used here it is under 1%.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F


def _best(fn, repeats: int, device: torch.device) -> tuple[float, float]:
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    times = sorted(times[1:])  # the first touches fresh pages
    return times[0], times[len(times) // 2]


def measure_bandwidth(size_mb: int = 1024, repeats: int = 15, device: str = "cpu") -> dict:
    """GB/s (1e9 bytes) for read, copy and gemv; 'best' and 'median' of the repeats."""
    device = torch.device(device)
    elements = size_mb * 2**20 // 4
    x = torch.ones(elements, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    columns = 8192
    weight = x[: elements // columns * columns].view(-1, columns)  # the same memory as a matrix
    vector = torch.ones(1, columns, dtype=torch.float32, device=device)
    nbytes = x.numel() * 4
    results = {}
    with torch.inference_mode():
        for name, fn, moved in (
            ("read", lambda: x.sum(), nbytes),
            ("copy", lambda: y.copy_(x), 2 * nbytes),
            ("gemv", lambda: F.linear(vector, weight), weight.numel() * 4),
        ):
            best, median = _best(fn, repeats, device)
            results[name] = {"best_gb_s": moved / best / 1e9, "median_gb_s": moved / median / 1e9}
    read = max(results["read"]["best_gb_s"], results["gemv"]["best_gb_s"])
    return {
        "device": str(device),
        "buffer_mb": size_mb,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        **results,
        "read_bandwidth_gb_s": read,
    }


def roofline(weight_bytes: int, bandwidth_gb_s: float) -> dict:
    """The most single-stream decode can do if it only waited on reading the weights."""
    seconds = weight_bytes / (bandwidth_gb_s * 1e9)
    return {
        "weight_bytes": weight_bytes,
        "bandwidth_gb_s": bandwidth_gb_s,
        "min_step_ms": seconds * 1000,
        "max_decode_tokens_per_s": 1 / seconds,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--weight-bytes",
        type=float,
        default=None,
        help="also print the roofline for this many bytes of weights (e.g. 1.086e9)",
    )
    args = parser.parse_args(argv)
    result = measure_bandwidth(args.size_mb, args.repeats, args.device)
    if args.weight_bytes:
        result["roofline"] = roofline(int(args.weight_bytes), result["read_bandwidth_gb_s"])
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
