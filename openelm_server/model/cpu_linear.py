"""Linear layers for the CPU with their weights in oneDNN's own layout.

On the CPU, ``F.linear`` runs MKL's sgemm, which for the few rows of a decode step (one per
running sequence) reads the weights far below the memory bandwidth, and slower still on AMD
CPUs. oneDNN's inner product with weights reordered once at start-up does much better: on a
2-core AMD EPYC, an OpenELM-270M float32 decode step went from 81 to 50 ms
for one sequence, 146 to 84 ms for 4 and 159 to 126 ms for 16, and prefill got faster too.
bfloat16 models use it too where oneDNN has a bfloat16 path on this CPU (AVX512-BF16, AMX or
AVX-NE-CONVERT; PyTorch refuses it elsewhere): those are the CPUs where bfloat16 matmuls run on
their own instructions, and timing decides there as for float32. Never for a float32 model:
bfloat16 is a precision, chosen with ``--dtype``, not a kernel.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from openelm_server.model.openelm import OpenELM

log = logging.getLogger(__name__)

ONEDNN_NEEDS = (
    "oneDNN linear layers need the CPU and a float32 model, or a bfloat16 one on a CPU with "
    "bfloat16 instructions (AVX512-BF16, AMX or AVX-NE-CONVERT)"
)


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


def onednn_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN linear layers can hold a model of ``dtype`` on ``device`` (see above)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


def can_use_onednn(model: OpenELM) -> bool:
    weight = model.transformer.token_embeddings.weight
    return onednn_runs(weight.device, weight.dtype)


def use_onednn_linears(model: OpenELM) -> None:
    """Swap every linear layer of ``model`` for a oneDNN one, in place, so that the weights are
    held once, in oneDNN's layout. With tied embeddings the logits get a reordered copy of the
    embedding matrix (the lookup still needs the plain one): that copy is the only extra memory
    (164 MB for 270M, 393 MB for 3B)."""
    if not can_use_onednn(model):
        raise ValueError(ONEDNN_NEEDS)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                setattr(module, name, OneDnnLinear(child.weight))
    if model.lm_head is None:
        model.lm_head = OneDnnLinear(model.transformer.token_embeddings.weight)
    _release_checkpoint_file(model)


def embedding_copy_megabytes(model: OpenELM) -> float:
    """What oneDNN costs in memory: with tied embeddings, the logits' reordered copy of the
    embedding matrix (the lookup still needs the plain one)."""
    embedding = model.transformer.token_embeddings.weight
    return embedding.numel() * embedding.element_size() / 1e6 if model.config.share_input_output_layers else 0.0


def _release_checkpoint_file(model: OpenELM) -> None:
    """A float32 checkpoint loads onto the CPU as views of the memory-mapped safetensors file.
    The reorder above reads every page of it, and while any tensor (the embedding, the norms)
    still points into the file the whole mapping stays resident: a second copy of the weights
    in the process's memory. Copying the few remaining tensors out lets the mapping go."""
    for parameter in model.parameters():
        parameter.data = parameter.data.clone()


def use_plain_linears(model: OpenELM) -> None:
    """Undo :func:`use_onednn_linears`: plain ``nn.Linear`` layers with dense weights again."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, OneDnnLinear):
                weight = child.weight.to_dense()
                with torch.device("meta"):
                    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
                linear.weight = nn.Parameter(weight, requires_grad=False)
                setattr(module, name, linear)
    if model.config.share_input_output_layers:
        model.lm_head = None
