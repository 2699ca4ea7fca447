"""The CPU's linear-layer kernels on a model's real layer shapes: what bounds decoding on this CPU.

    python -m bench.cpu_linears                       # OpenELM-270M's shapes, float32
    python -m bench.cpu_linears --size 3B --rows 1,16 --out results.json

On the CPU a decode step is mostly its linear layers (77% of a one-stream OpenELM-270M step in
py-spy). One stream reads every weight once per token, so its kernel should run at the memory's
bandwidth; 16 streams multiply each weight by 16 rows, so theirs should run near the cores'
arithmetic peak. This times, for each row count, one pass over all of the model's linear layers in
order (each weight cold in the caches, as in a step), with each kernel the server can use:

* ``onednn``: oneDNN's inner product on weights reordered once (cpu_linear.py);
* ``pytorch``: ``F.linear`` (MKL's sgemm);
* ``int8``: ``aten._weight_int8pack_mm`` on int8 weights with bfloat16 activations;
* ``own``: our float32 AVX2 kernel (cpu_matmul.py) on weights in its panels, where it builds;
* ``int8_own``: our AVX2 kernel on int8 weights (cpu_matmul.py), float32 activations, where it builds;
* ``bf16_own``: our AVX2 kernel on bfloat16 weights, float32 activations (``--dtype bfloat16`` on a
  CPU without bfloat16 instructions), where it builds;
* ``own_avx512``, ``int8_own_avx512``, ``bf16_own_avx512``: the same built for AVX-512, where
  PyTorch runs with it (the server times both builds at start-up and keeps the faster).

and reports GB/s of weights read and GFLOP/s, next to this machine's memory read bandwidth and
its float32 matmul peak (a large square product). Random weights: only shapes matter here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from bench.bandwidth import measure_bandwidth
from bench.common import machine_info, now_iso, versions, write_json
from openelm_server.model import cpu_extension, cpu_matmul
from openelm_server.model.config import OpenELMConfig
from openelm_server.testing.checkpoints import published_config


def linear_shapes(config: OpenELMConfig) -> list[tuple[int, int]]:
    """(out_features, in_features) of every linear layer in order, the tied logits layer last."""
    shapes = []
    dim, head_dim = config.model_dim, config.head_dim
    for layer in range(config.num_layers):
        query_heads, kv_heads = config.num_query_heads[layer], config.num_kv_heads[layer]
        hidden = config.ffn_dims[layer]
        shapes += [
            ((query_heads + 2 * kv_heads) * head_dim, dim),
            (dim, query_heads * head_dim),
            (2 * hidden if config.ffn_with_glu else hidden, dim),
            (dim, hidden),
        ]
    return shapes + [(config.vocab_size, dim)]


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times) / 1e9


OWN_SUFFIXES = {"AVX2": "", "AVX-512": "_avx512"}  # our kernels' names per instruction set they are built for


def kernels(weights: list[torch.Tensor]) -> dict:
    """Per kernel: a function that runs every layer once, each on the input of its width from
    ``inputs`` ({in_features: [rows, in_features]}), with the weights prepared for it here."""
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
    int8 = []
    for w in weights:
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        int8.append((torch.round(w / scales[:, None]).to(torch.int8), scales.to(torch.bfloat16)))

    def run_onednn(inputs):
        for w in onednn:
            torch.ops.mkldnn._linear_pointwise(inputs[w.size(1)], w, None, "none", [], "")

    def run_pytorch(inputs):
        for w in weights:
            F.linear(inputs[w.shape[1]], w)

    def run_int8(inputs):
        for w, s in int8:
            torch.ops.aten._weight_int8pack_mm(inputs[w.shape[1]].to(torch.bfloat16), w, s)

    found = {"onednn": run_onednn, "pytorch": run_pytorch, "int8": run_int8}
    if cpu_extension.available():
        panels = [(cpu_matmul.pack(w), w.shape[0]) for w in weights]
        int8_panels = [(cpu_matmul.pack(w), s.float(), w.shape[0]) for w, s in int8]
        bfloat16_panels = [(cpu_matmul.pack(w.to(torch.bfloat16)), w.shape[0]) for w in weights]
        for isa in cpu_extension.matmul_isas():

            def run_own(inputs, isa=isa):
                for packed, out_features in panels:
                    cpu_matmul.float32_matmul(inputs[packed.shape[1]], packed, out_features, isa)

            def run_int8_own(inputs, isa=isa):
                for packed, scales, out_features in int8_panels:
                    cpu_matmul.int8_matmul(inputs[packed.shape[1]], packed, scales, out_features, isa)

            def run_bfloat16_own(inputs, isa=isa):
                for packed, out_features in bfloat16_panels:
                    cpu_matmul.bfloat16_matmul(inputs[packed.shape[1]], packed, out_features, isa)

            suffix = OWN_SUFFIXES[isa]
            found |= {f"own{suffix}": run_own, f"int8_own{suffix}": run_int8_own, f"bf16_own{suffix}": run_bfloat16_own}
    return found


def time_pass(run, inputs: dict, repeats: int) -> float:
    run(inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="270M", choices=("270M", "450M", "1_1B", "3B"))
    parser.add_argument("--layers", type=int, default=None, help="only the first N layers (quicker)")
    parser.add_argument("--rows", default="1,4,16,64", help="rows per step (running sequences)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--bandwidth-mb", type=int, default=1024)
    parser.add_argument("--out", default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    raw = published_config(args.size)
    if args.layers:
        raw["num_transformer_layers"] = args.layers
    config = OpenELMConfig.from_dict(raw)
    shapes = linear_shapes(config)
    weights = [torch.randn(shape) for shape in shapes]
    parameters = sum(w.numel() for w in weights)
    results = {
        "benchmark": "CPU linear kernels",
        "date": now_iso(),
        "machine": machine_info(),
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "size": args.size,
        "layers": config.num_layers,
        "linear_layers": len(shapes),
        "parameters": parameters,
        "read_gb_s": measure_bandwidth(size_mb=args.bandwidth_mb, repeats=5)["read"]["best_gb_s"],
        "matmul_peak_gflop_s": matmul_peak_gflops(),
        "timings": [],
    }
    print(
        f"{args.size}: {len(shapes)} linear layers, {parameters / 1e6:.0f}M weights; {results['threads']} threads; "
        f"read {results['read_gb_s']:.1f} GB/s, float32 matmul peak {results['matmul_peak_gflop_s']:.0f} GFLOP/s",
        flush=True,
    )
    for name, run in kernels(weights).items():
        bytes_per_weight = {"int8": 1, "bf16": 2}.get(name.split("_")[0], 4)
        for rows in (int(r) for r in args.rows.split(",")):
            inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
            seconds = time_pass(run, inputs, args.repeats)
            row = {
                "kernel": name,
                "rows": rows,
                "ms": seconds * 1e3,
                "weights_gb_s": parameters * bytes_per_weight / seconds / 1e9,
                "gflop_s": 2 * parameters * rows / seconds / 1e9,
            }
            results["timings"].append(row)
            print(
                f"{name:8s} {rows:3d} rows: {row['ms']:7.1f} ms per pass, {row['weights_gb_s']:5.1f} GB/s of weights, "
                f"{row['gflop_s']:5.0f} GFLOP/s",
                flush=True,
            )
    if args.out:
        write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
