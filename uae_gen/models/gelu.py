"""`gelu_tanh`: the tanh-approximated GELU of DiT's MLP, in a faster form for fp32 CPU tensors.

GELU_tanh(x) = x/2 (1 + tanh(z)) with z = sqrt(2/pi) (x + 0.044715 x^3) is exactly x * sigmoid(2z). torch's fp32 CPU
tanh is slow (6x its sigmoid on this project's 2-core AMD EPYC), and so are its tanh-GELU kernels: on the bench
DiT's MLP activations (8 x 64 x 1536) 0.93 ms forward and 1.03 ms backward, against 0.50 and 0.60 ms for the sigmoid
form in a few in-place steps below. Values agree to float rounding (~1e-7 relative). Other tensors (CUDA, bf16,
float64) and torch.compile get F.gelu(approximate="tanh") itself.
"""

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# 2z = x (_LINEAR + _CUBIC x^2)
_LINEAR = 2 * math.sqrt(2 / math.pi)
_CUBIC = _LINEAR * 0.044715


def _gate(x: torch.Tensor) -> torch.Tensor:
    """sigmoid(2z), a new tensor."""
    return torch.addcmul(x.new_tensor(_LINEAR), x, x, value=_CUBIC).mul_(x).sigmoid_()


class _SigmoidFormGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        gate = _gate(x)
        ctx.save_for_backward(x, gate)
        return x * gate

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, gate = ctx.saved_tensors
        # d/dx [x s] = s + x s (1 - s) d(2z)/dx, with d(2z)/dx = _LINEAR + 3 _CUBIC x^2.
        x_slope = torch.addcmul(x.new_tensor(_LINEAR), x, x, value=3 * _CUBIC).mul_(x)
        gate_slope = torch.addcmul(gate, gate, gate, value=-1)  # s (1 - s)
        return torch.addcmul(gate, gate_slope, x_slope).mul_(grad_out)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x, approximate="tanh"), computed as x * sigmoid(2z) for fp32 CPU tensors (module docstring)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.compiler.is_compiling():
        return F.gelu(x, approximate="tanh")
    if torch.is_grad_enabled() and x.requires_grad:
        return _SigmoidFormGelu.apply(x)
    return x * _gate(x)
