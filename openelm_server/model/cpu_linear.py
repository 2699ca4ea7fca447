"""Linear layers for the CPU with their weights in a kernel's own layout: ours or oneDNN's.

Three float32 kernels can run a model's linear layers on the CPU, and start-up times them on the
loaded model (linear_choice.py): PyTorch's ``F.linear`` on plain weights, oneDNN's (below), and
ours (cpu_matmul.py, where it builds), each holding the weights once, in its own layout.

On the CPU, ``F.linear`` runs MKL's sgemm, which for the few rows of a decode step (one per
running sequence) reads the weights far below the memory bandwidth, and slower still on AMD
CPUs. oneDNN's inner product with weights reordered once at start-up does much better: on a
2-core AMD EPYC, an OpenELM-270M float32 decode step went from 81 to 50 ms
for one sequence, 146 to 84 ms for 4 and 159 to 126 ms for 16, and prefill got faster too.
bfloat16 models use it too where oneDNN has a bfloat16 path on this CPU (AVX512-BF16, AMX or
AVX-NE-CONVERT; PyTorch refuses it elsewhere): those are the CPUs where bfloat16 matmuls run on
their own instructions, and timing decides there as for float32. Never for a float32 model:
bfloat16 is a precision, chosen with ``--dtype``, not a kernel. A bfloat16 model's weights can
also go to ours, with float32 for everything else (:func:`use_bfloat16_weights`): without timing
on CPUs without bfloat16 instructions, by timing against bfloat16 throughout on the others.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from openelm_server.model import cpu_extension, cpu_matmul
from openelm_server.model.openelm import OpenELM

log = logging.getLogger(__name__)

# --cpu-linear's kernels, as linear_choice.py names them; config.py holds the same names.
KERNELS = ("own", "onednn", "pytorch")

OWN_NEEDS = (
    "our linear kernel needs the CPU, with AVX2, where it builds (the start-up log says why it did not), and "
    "a float32 or bfloat16 model"
)
ONEDNN_NEEDS = (
    "oneDNN linear layers need the CPU and a float32 model, or a bfloat16 one on a CPU with "
    "bfloat16 instructions (AVX512-BF16, AMX or AVX-NE-CONVERT)"
)
NEEDS = {"own": OWN_NEEDS, "onednn": ONEDNN_NEEDS, "pytorch": "PyTorch's CPU linear kernel needs the CPU"}


class OneDnnLinear(nn.Module):
    """``y = x @ weight.T`` with the weight held as a oneDNN tensor; input and output are plain.

    The op is the one PyTorch's compiler uses for frozen linears: it takes and returns plain
    tensors, where converting every input to oneDNN's layout and the output back cost 5 ms of
    a 70 ms decode step (65 linears of OpenELM-270M). The weight is packed without a batch-size
    hint: packing for one row was 10% faster for a single stream and 40-60% slower from two rows on.
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features = weight.shape[0]
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch.ops.mkldnn._linear_pointwise(rows, self.weight, None, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)


class PanelLinear(nn.Module):
    """``y = x @ weight.T`` with our kernel, the weight (float32 or bfloat16) held in its panels of
    16 outputs; x and y float32; the kernel built for the instruction set that runs it fastest here."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = cpu_matmul.pack(weight.detach())
        self.matmul = cpu_matmul.bfloat16_matmul if weight.dtype == torch.bfloat16 else cpu_matmul.float32_matmul
        self.isa = cpu_extension.matmul_isa()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.weight, self.out_features, self.isa)

    def plain_weight(self) -> torch.Tensor:
        return cpu_matmul.unpack(self.weight, self.out_features)

    def extra_repr(self) -> str:
        weights = str(self.weight.dtype).removeprefix("torch.")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, our {self.isa} kernel, "
            f"{weights} weights"
        )


def own_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether our float32 kernel can hold a model of ``dtype`` on ``device``: float32 on a CPU where it built."""
    return device.type == "cpu" and dtype == torch.float32 and cpu_extension.available()


def kernel_runs(kernel: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``kernel`` (one of KERNELS) can hold the linear layers of a ``dtype`` model on ``device``."""
    if kernel == "own":
        return own_runs(device, dtype)
    if kernel == "onednn":
        return onednn_runs(device, dtype)
    return device.type == "cpu"


def kernels_that_run(model: OpenELM) -> list[str]:
    """The kernels of KERNELS that can hold ``model``'s float linear layers here, in that order."""
    weight = model.transformer.token_embeddings.weight
    return [kernel for kernel in KERNELS if kernel_runs(kernel, weight.device, weight.dtype)]


def onednn_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN linear layers can hold a model of ``dtype`` on ``device`` (see above)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


def use_linears(model: OpenELM, kernel: str) -> None:
    """Hold every linear layer of ``model`` for ``kernel`` (one of KERNELS), in place, the weights
    once, in its layout. With tied embeddings the logits of "own" and "onednn" get a copy of the
    embedding matrix in theirs (the lookup still needs the plain one): that copy is the only extra
    memory (164 MB for 270M, 393 MB for 3B)."""
    if kernel not in kernels_that_run(model):
        raise ValueError(NEEDS[kernel])
    if linear_kernel(model) == kernel:
        return
    use_plain_linears(model)
    if kernel == "pytorch":
        return
    _hold_linears(model, OneDnnLinear if kernel == "onednn" else PanelLinear)
    _release_checkpoint_file(model)


def _hold_linears(model: OpenELM, layer: type[nn.Module]) -> None:
    """Every plain linear layer of ``model`` becomes ``layer`` of its weight, in place, and tied
    logits get one of the embedding matrix."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                setattr(module, name, layer(child.weight))
    if model.lm_head is None:
        model.lm_head = layer(model.transformer.token_embeddings.weight)


def linear_kernel(model: OpenELM) -> str:
    """The kernel (one of KERNELS) that ``model``'s float linear layers are held for now."""
    layer = model.transformer.layers[0].attn.qkv_proj
    return "onednn" if isinstance(layer, OneDnnLinear) else "own" if isinstance(layer, PanelLinear) else "pytorch"


def bfloat16_weights_run(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a ``dtype`` model on ``device`` can keep bfloat16 linear weights for our kernel
    (:func:`use_bfloat16_weights`): a bfloat16 model on a CPU where our kernels build."""
    return device.type == "cpu" and dtype == torch.bfloat16 and cpu_extension.available()


def use_bfloat16_weights(model: OpenELM) -> None:
    """A bfloat16 model's linear layers keep their bfloat16 weights, in our kernel's panels, and
    everything else becomes float32 (embedding, norms, so activations and the KV cache too).

    On a CPU without bfloat16 instructions, PyTorch multiplies bfloat16 by converting every
    operand to float32 and back, slower than float32 itself; our kernel widens each weight as it
    reads it (a shift) and multiplies in float32, so decoding costs the memory traffic of
    bfloat16 weights, half of float32's, and the answers float32 activations give. The tied
    logits get their own bfloat16 copy of the embedding, whose lookup is float32."""
    _hold_linears(model, PanelLinear)
    for parameter in model.parameters():
        parameter.data = parameter.data.float()


def use_bfloat16_throughout(model: OpenELM) -> None:
    """Undo :func:`use_bfloat16_weights`: plain linear layers with their bfloat16 weights, and
    every other parameter bfloat16 again (exactly: it was bfloat16 before)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, PanelLinear):
                setattr(module, name, _plain_linear(child.plain_weight()))
    if model.config.share_input_output_layers:
        model.lm_head = None
    for parameter in model.parameters():
        parameter.data = parameter.data.bfloat16()


def _plain_linear(weight: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` without bias holding ``weight`` itself (no copy, no initialisation)."""
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


def embedding_copy_megabytes(model: OpenELM) -> float:
    """What ours and oneDNN's kernels cost in memory: with tied embeddings, the logits' copy of
    the embedding matrix in their layout (the lookup still needs the plain one), in the dtype of
    the weights they hold (bfloat16 in ours for a bfloat16 model whose rest is float32)."""
    if not model.config.share_input_output_layers:
        return 0.0
    embedding = model.transformer.token_embeddings.weight
    held = model.lm_head.weight if isinstance(model.lm_head, PanelLinear) else embedding
    return embedding.numel() * held.element_size() / 1e6


def _release_checkpoint_file(model: OpenELM) -> None:
    """A float32 checkpoint loads onto the CPU as views of the memory-mapped safetensors file.
    The reorder above reads every page of it, and while any tensor (the embedding, the norms)
    still points into the file the whole mapping stays resident: a second copy of the weights
    in the process's memory. Copying the few remaining tensors out lets the mapping go."""
    for parameter in model.parameters():
        parameter.data = parameter.data.clone()


def use_plain_linears(model: OpenELM) -> None:
    """Undo :func:`use_linears`: plain ``nn.Linear`` layers with dense weights again."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (OneDnnLinear, PanelLinear)):
                weight = child.weight.to_dense() if isinstance(child, OneDnnLinear) else child.plain_weight()
                # bfloat16 weights of a float32 model (use_bfloat16_weights) become float32 layers
                weight = weight.to(model.transformer.token_embeddings.weight.dtype)
                setattr(module, name, _plain_linear(weight))
    if model.config.share_input_output_layers:
        model.lm_head = None
