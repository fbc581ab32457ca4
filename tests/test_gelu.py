"""`gelu_tanh`: F.gelu(approximate="tanh") in its sigmoid form for fp32 CPU tensors; values and gradients agree to
float rounding, and every other tensor gets F.gelu itself."""

import pytest
import torch
import torch.nn.functional as F

from uae_gen.models.gelu import gelu_tanh


def reference_and_ours(x: torch.Tensor, grad_out: torch.Tensor):
    results = []
    for fn in (lambda t: F.gelu(t, approximate="tanh"), gelu_tanh):
        leaf = x.clone().requires_grad_()
        out = fn(leaf)
        out.backward(grad_out)
        results.append((out.detach(), leaf.grad))
    return results


@pytest.mark.parametrize("scale", [0.1, 1.0, 4.0, 30.0])  # around zero, the curved part, both saturated tails
def test_values_and_gradient_match_torch(scale):
    torch.manual_seed(0)
    x = torch.randn(8, 64, 96) * scale
    grad_out = torch.randn_like(x)
    (out_ref, grad_ref), (out, grad) = reference_and_ours(x, grad_out)
    assert torch.allclose(out, out_ref, rtol=1e-6, atol=1e-6 * scale)
    assert torch.allclose(grad, grad_ref, rtol=1e-5, atol=1e-5)


def test_extreme_inputs_stay_finite():
    x = torch.tensor([-1e6, -50.0, -3.0, 0.0, 3.0, 50.0, 1e6])
    (out_ref, grad_ref), (out, grad) = reference_and_ours(x, torch.ones_like(x))
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert torch.equal(out[[0, 1, 3]], torch.zeros(3)) and torch.equal(out[[5, 6]], x[[5, 6]])
    assert torch.allclose(grad, grad_ref, atol=1e-6)


def test_without_grad_same_values():
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert torch.allclose(gelu_tanh(x), F.gelu(x, approximate="tanh"), rtol=1e-6, atol=1e-7)
        assert gelu_tanh(x).grad_fn is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_are_torch_s_gelu_exactly(dtype):
    x = torch.randn(4, 32, dtype=dtype, requires_grad=True)
    assert torch.equal(gelu_tanh(x), F.gelu(x, approximate="tanh"))
    assert gelu_tanh(x).grad_fn.name() == "GeluBackward0"


def test_fp32_cpu_takes_the_sigmoid_form():
    x = torch.randn(4, 32, requires_grad=True)
    assert gelu_tanh(x).grad_fn.name() == "_SigmoidFormGeluBackward"
