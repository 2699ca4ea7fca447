"""Int8 weight-only linear layers: half the bytes of bfloat16 and a quarter of float32's per decode step.

Decoding one sequence reads every weight once per token, so its speed is the weights' bytes over
the memory bandwidth. ``--quantization int8`` stores each linear layer's weight as int8 with one
scale per output channel (row): ``weight ≈ int8 * scales[:, None]``, symmetric, the scale being the
row's largest magnitude / 127. Activations stay floating point; embeddings and norms stay as loaded.

Invariants of :class:`Int8Linear`:

- ``weight`` is int8 [out_features, in_features], contiguous, in a fresh (64-byte aligned)
  allocation; with our CPU kernel (``cpu_kernel == "own"``) it is in that kernel's panels
  instead (cpu_matmul.pack: [ceil(out_features / 16), in_features, 16]), and
  :meth:`Int8Linear.dequantized` unpacks it. ``scales`` is float32 [out_features].
- ``in_features`` is a multiple of :data:`IN_FEATURES_MULTIPLE`: PyTorch's CPU kernel reads 8
  (AVX2) or 16 (AVX-512) values at a time and reads garbage past the row's end otherwise
  (measured: wrong outputs for in_features = 3, 5, 60, ... in bfloat16, with no error raised).
- The tied output layer (OpenELM shares the token embedding with the logits) gets an int8 copy
  of the embedding: the lookup keeps the float table, the logits read the int8 one. That costs a
  quarter of the float32 embedding (41 MB for 270M) and saves reading the whole float table every
  decode step (164 MB of 270M's 1.1 GB in float32; left in float it would be 40% of the int8
  model's bytes per token).

The matmul:

- CPU: our own kernel (cpu_matmul.py: AVX2 or AVX-512, float32 products and sums) where it builds, else
  PyTorch's ``aten._weight_int8pack_mm``; start-up times both on the model and keeps ours unless
  PyTorch's is clearly faster (linear_choice.py); ``cpu_kernel`` says which a layer uses.
  PyTorch's runs in bfloat16: its float32 variant is a plain scalar loop on x86 (5-10x slower
  than float32 ``F.linear`` on a 2-core AMD EPYC), while the bfloat16 one is vectorised. So on
  it the layer rounds its input and its scales to bfloat16 and its output comes back from
  bfloat16. That kernel loads its input with aligned vector loads and crashes the process on an
  input that is not 16-byte aligned, so the input is copied to a fresh tensor when it is not.
- CUDA: our Triton kernel (int8_triton.py) for steps of up to :data:`CUDA_KERNEL_MAX_ROWS` rows,
  which covers every decode step; PyTorch's CUDA variant of ``_weight_int8pack_mm`` computes each
  output on its own without tensor cores (on an H200, 0.67 ms for one row of a 24576 x 3072 layer
  against 0.06 ms for ours). Longer steps (prompts) dequantize the weight to the activations'
  dtype and use the ordinary matmul, compute-bound there anyway: at 256 rows the dequantized
  product (0.32 ms) beat ours (0.40 ms) on the narrow 3072 x 12288 layer, at 128 rows ours still
  won on both layer shapes timed. Both capture into CUDA graphs.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from openelm_server.model import cpu_extension, cpu_matmul

QUANTIZATIONS = ("none", "int8")
IN_FEATURES_MULTIPLE = 16
CUDA_KERNEL_MAX_ROWS = 128
_ALIGNMENT_BYTES = 64


class QuantizationError(Exception):
    """int8 cannot run here or on this checkpoint; the message says why, in one line."""


class Int8Linear(nn.Module):
    """``y = x @ (weight * scales[:, None]).T`` with an int8 weight; x and y keep their dtype."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.cpu_kernel = "pytorch"
        self.isa = None  # our kernel's instruction set (cpu_extension.matmul_isa) while it computes
        if weight.device.type == "cpu" and cpu_extension.available():
            self.use_cpu_kernel("own")  # start-up times both and may switch back

    @classmethod
    def quantize(cls, weight: torch.Tensor, name: str) -> Int8Linear:
        """Per-output-channel symmetric int8 of a float [out, in] weight, on the weight's device."""
        if weight.dim() != 2 or weight.shape[1] % IN_FEATURES_MULTIPLE:
            raise QuantizationError(
                f"{name}: weight of shape {tuple(weight.shape)} cannot be int8: the int8 matmul needs "
                f"in_features to be a multiple of {IN_FEATURES_MULTIPLE}; use --quantization none"
            )
        values = weight.detach().float()
        largest = values.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
        scales = largest / 127
        quantized = torch.div(values, scales.unsqueeze(1)).round_().clamp_(-127, 127).to(torch.int8)
        return cls(quantized, scales)

    def use_cpu_kernel(self, kernel: str) -> None:
        """Compute with our CPU kernel ("own") or PyTorch's ("pytorch"), the weight laid out for it."""
        if kernel != self.cpu_kernel:
            own = kernel == "own"
            self.weight = cpu_matmul.pack(self.weight) if own else cpu_matmul.unpack(self.weight, self.out_features)
            self.cpu_kernel = kernel
            self.isa = cpu_extension.matmul_isa() if own else None

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight the layer stands for, rounded to ``dtype`` once (not the scales first)."""
        weight = cpu_matmul.unpack(self.weight, self.out_features) if self.cpu_kernel == "own" else self.weight
        return (weight.float() * self.scales.unsqueeze(1)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_kernel == "own":
            if x.dtype == torch.float32:  # one call: what a one-row decode step needs
                return cpu_matmul.int8_matmul(x, self.weight, self.scales, self.out_features, self.isa)
            return cpu_matmul.int8_matmul(x.float(), self.weight, self.scales, self.out_features, self.isa).to(x.dtype)
        rows = x.reshape(-1, self.in_features)
        if x.is_cuda:
            if rows.shape[0] > CUDA_KERNEL_MAX_ROWS:
                return F.linear(x, self.dequantized(x.dtype))
            from openelm_server.model.int8_triton import int8_weight_matmul  # Triton: CUDA machines only

            out = int8_weight_matmul(rows.contiguous(), self.weight, self.scales)
            return out.view(*x.shape[:-1], self.out_features)
        rows = rows.to(torch.bfloat16).contiguous()
        if rows.data_ptr() % _ALIGNMENT_BYTES:
            rows = rows.clone()
        out = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scales.to(torch.bfloat16))
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kernel = f", {self.cpu_kernel} kernel" if self.weight.device.type == "cpu" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel{kernel}"


def check_int8_support(device: torch.device) -> None:
    """One small int8 matmul against the float one, before any weight loads: an error names
    what is missing here (the operator, the device type) instead of failing mid-load or serving
    wrong numbers."""
    if device.type not in ("cpu", "cuda"):
        raise QuantizationError(f"--quantization int8 runs on the CPU and CUDA, not on {device.type}")
    if device.type == "cpu" and not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        raise QuantizationError(
            f"--quantization int8 needs torch.ops.aten._weight_int8pack_mm, which torch {torch.__version__} "
            "lacks; upgrade PyTorch or use --quantization none"
        )
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise QuantizationError(
            "--quantization int8 on CUDA needs Triton (PyTorch's CUDA wheels bring it); "
            "install triton or use --quantization none"
        )
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=generator).to(device)
    x = torch.randn(3, 64, generator=generator).to(device)
    layer = Int8Linear.quantize(weight, "start-up check")
    try:
        got = layer(x)
    except Exception as error:  # a missing kernel, or Triton failing to compile for this GPU
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise QuantizationError(
            f"--quantization int8: the int8 matmul fails on {device} ({first_line[:200]}); use --quantization none"
        ) from error
    want = x @ layer.dequantized(torch.float32).T
    error = float((got - want).abs().max() / want.abs().max())
    if not error < 0.02:  # bfloat16 rounding gives < 0.01
        raise QuantizationError(
            f"--quantization int8: the int8 matmul on {device} is off by {error:.3g} (relative) on a "
            "test matrix; use --quantization none"
        )


def int8_megabytes(model: nn.Module) -> float:
    """Bytes held by the int8 layers (weights and scales), in MB."""
    return (
        sum(
            layer.weight.numel() + layer.scales.numel() * layer.scales.element_size()
            for layer in model.modules()
            if isinstance(layer, Int8Linear)
        )
        / 1e6
    )
