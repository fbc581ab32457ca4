"""`Linear`: nn.Linear whose fp32 CPU matmuls run on oneDNN instead of MKL.

torch sends fp32 CPU matmuls to MKL's sgemm; its bundled oneDNN (the library torch uses for bf16 matmuls and
torch.compile's CPU backend for inference) has AVX-512 fp32 kernels that are faster on the DiT's shapes. On the
2-core AMD EPYC (AVX-512) of this project, for the plain DiT of bench/bench_dit.py (width 384, 512 tokens), the
route made a training step 1.10x faster (356 vs 393 ms) and a sampling step 1.17x (106 vs 127 ms), measured as
interleaved pairs in one process, with the forward and input-gradient GEMMs on oneDNN; moving the weight gradient of
the large layers there too (see the backward) took the training step from 333 to 320 ms (1.03x) in the same way.

The route is `torch.ops.mkldnn._linear_pointwise`, the op torch.compile emits for CPU linears. It is taken only for
fp32 CPU tensors outside autocast (autocast casts for F.linear itself), on CPUs torch runs with AVX-512 (where it
was measured) and while oneDNN is enabled, so `torch.backends.mkldnn.flags(enabled=False)` turns it off. Everywhere
else `Linear` is exactly nn.Linear. Parameters and state-dict keys are nn.Linear's.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def _onednn_linear_op():
    """The oneDNN linear op of this torch build, or None (torch without oneDNN or without the op)."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _onednn_linear_op()
_AVX512_CPU = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


_MIN_ONEDNN_WEIGHT_GRAD = 64  # rows and output features; below that torch.mm was faster on the weight gradient


def transposed_copy(rows: torch.Tensor) -> torch.Tensor:
    """rows.T (2-D) as a contiguous tensor, through a staging copy whose row length is an odd number of cache lines.

    The transposed copy reads the source column by column. With rows a multiple of 2 KiB (1536 floats) those reads
    fall on two of the L1 cache's 64 sets and evict each other; padding each row to an odd number of 64-byte lines
    spreads them over all sets, and the staging copy (plain and fast) also brings the rows into cache. For 512 rows
    from cold memory on the project's CPU: width 384 0.14 vs 0.29 ms, 1152 0.36 vs 0.65, 1536 0.37 vs 1.15 for
    torch's direct transposed copy."""
    height, width = rows.shape
    padding = (16 - width) % 32  # floats: width + padding is 16 mod 32, an odd multiple of 64 bytes
    staged = rows.new_empty(height, width + padding)[:, :width]
    staged.copy_(rows)
    return staged.t().contiguous()


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias on oneDNN (x: (..., in), weight: (out, in) contiguous), with autograd."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _OneDNNLinearFunction.apply(x, weight, bias)
    return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")  # sampling: skip the autograd Function's overhead


class _OneDNNLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()  # autograd may hand in an expanded (stride-0) gradient
        grad_x = grad_weight = grad_bias = None
        grad_rows = grad_out.view(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:  # grad_out @ weight, as a linear with weight.T as its (in, out) weight
            grad_x = _ONEDNN_LINEAR(grad_out, weight.t(), None, "none", [], "")
        if ctx.needs_input_grad[1]:
            x_rows = x.reshape(-1, x.shape[-1])
            if min(grad_rows.shape) >= _MIN_ONEDNN_WEIGHT_GRAD:
                # grad_out.T @ x sums over tokens, so oneDNN needs grad_out.T as a contiguous copy (x.T it takes
                # strided, as a weight); at the DiT's sizes the faster GEMM pays for that copy.
                grad_weight = _ONEDNN_LINEAR(transposed_copy(grad_rows), x_rows.t(), None, "none", [], "")
            else:  # a few conditions (adaLN) or outputs (final layer): the copy would cost more than it saves
                grad_weight = grad_rows.t() @ x_rows
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)
        return grad_x, grad_weight, grad_bias


def use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        _ONEDNN_LINEAR is not None
        and _AVX512_CPU
        and torch.backends.mkldnn.enabled
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and weight.is_contiguous()
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()  # let torch.compile see (and lower) a plain linear
    )


class Linear(nn.Linear):
    """nn.Linear that takes the oneDNN route for fp32 CPU tensors where that is faster (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_onednn(x, self.weight):
            return onednn_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
