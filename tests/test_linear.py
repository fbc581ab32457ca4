"""`Linear`: nn.Linear that runs fp32 CPU matmuls on oneDNN. Same values and gradients as nn.Linear, the oneDNN
route taken where it applies, nn.Linear itself everywhere else."""

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from uae_gen.models.dit import UAEDiT
from uae_gen.models.linear import Linear, transposed_copy, use_onednn

ONEDNN_OP = "mkldnn::_linear_pointwise"
# torch.backends.mkldnn.flags() also sets oneDNN's TF32 switch, and warns that it is GPU-only.
quiet_flags = pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
needs_onednn_route = pytest.mark.skipif(
    not use_onednn(torch.zeros(1, 1), torch.zeros(1, 1)), reason="the oneDNN route needs an AVX-512 CPU torch build")


def pair(in_features=48, out_features=80, bias=True):
    torch.manual_seed(0)
    ours = Linear(in_features, out_features, bias=bias)
    reference = nn.Linear(in_features, out_features, bias=bias)
    reference.load_state_dict(ours.state_dict())
    return ours, reference


def ops_run(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {event.key for event in prof.key_averages()}


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


INPUTS = {
    "tokens (B, N, D)": lambda: torch.randn(4, 16, 48),
    "rows of a transposed tensor": lambda: torch.randn(48, 10).t(),
    "condition (B, 1, D)": lambda: torch.randn(4, 1, 48),
    "expanded (stride 0)": lambda: torch.randn(1, 48).expand(6, 48),
    "one slice of a larger tensor": lambda: torch.randn(4, 3, 48)[:, 1],
    "a single vector": lambda: torch.randn(48),
}


@pytest.mark.parametrize("make_input", INPUTS.values(), ids=INPUTS.keys())
@pytest.mark.parametrize("loss", ["sum", "weighted"])  # .sum() hands the backward an expanded gradient
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_match_nn_linear(make_input, loss, bias):
    ours, reference = pair(bias=bias)
    x = make_input()
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_ref = ours(x_ours), reference(x_ref)
    assert out_ours.shape == out_ref.shape
    assert relative_error(out_ours, out_ref) < 1e-6
    weights = torch.randn(out_ref.shape)
    for out in (out_ours, out_ref):
        (out.sum() if loss == "sum" else (out * weights).sum()).backward()
    assert relative_error(x_ours.grad, x_ref.grad) < 1e-6
    assert relative_error(ours.weight.grad, reference.weight.grad) < 1e-6
    if bias:
        assert relative_error(ours.bias.grad, reference.bias.grad) < 1e-6


def test_frozen_input_and_frozen_weight():
    ours, reference = pair()
    x = torch.randn(4, 16, 48)
    ours(x).sum().backward()  # input without grad (the patch embedding's role)
    reference(x).sum().backward()
    assert relative_error(ours.weight.grad, reference.weight.grad) < 1e-6
    ours.requires_grad_(False)
    x_grad = x.clone().requires_grad_()
    ours(x_grad).pow(2).sum().backward()
    assert ours.weight.grad is not None and x_grad.grad.shape == x.shape


@needs_onednn_route
def test_fp32_cpu_takes_the_onednn_route_with_and_without_grad():
    ours, _ = pair()
    x = torch.randn(4, 16, 48, requires_grad=True)
    assert ONEDNN_OP in ops_run(lambda: ours(x).sum().backward())
    assert ours(x).grad_fn.name() == "_OneDNNLinearFunctionBackward"
    with torch.no_grad():
        assert ONEDNN_OP in ops_run(lambda: ours(x))
        assert ours(x).grad_fn is None


@pytest.mark.parametrize("shape", [(64, 80), (7, 48), (512, 1536), (33, 1)])
def test_transposed_copy_is_the_exact_transpose(shape):
    rows = torch.randn(shape)
    copy = transposed_copy(rows)
    assert copy.is_contiguous() and torch.equal(copy, rows.t())


@needs_onednn_route
@pytest.mark.parametrize("rows, out_features, weight_grad_gemm", [
    (64, 80, ONEDNN_OP),  # tokens x features both large enough: oneDNN, through the transposed copy
    (8, 80, "aten::mm"),  # a few conditions (adaLN): torch.mm
    (64, 16, "aten::mm"),  # a few outputs (final layer): torch.mm
])
def test_weight_gradient_route_by_size(rows, out_features, weight_grad_gemm):
    ours, reference = pair(out_features=out_features)
    x = torch.randn(rows, 48)  # no input gradient: the only backward GEMM is the weight gradient's
    out = ours(x)
    assert weight_grad_gemm in ops_run(lambda: out.backward(torch.ones_like(out)))
    reference(x).sum().backward()
    assert relative_error(ours.weight.grad, reference.weight.grad) < 1e-6
    assert relative_error(ours.bias.grad, reference.bias.grad) < 1e-6


@quiet_flags
def test_elsewhere_it_is_nn_linear_exactly():
    ours, reference = pair()
    x = torch.randn(4, 16, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's own cast of F.linear
        out = ours(x)
        assert out.dtype == torch.bfloat16 and torch.equal(out, reference(x))
    double = x.double()
    assert torch.equal(ours.double()(double), reference.double()(double))
    with torch.backends.mkldnn.flags(enabled=False):  # torch's switch turns the route off
        ours.float()
        reference.float()
        ran = ops_run(lambda: ours(x))
        assert ONEDNN_OP not in ran and torch.equal(ours(x), reference(x))


def test_state_dict_is_nn_linear_s():
    ours, _ = pair()
    plain = nn.Linear(48, 80)
    plain.load_state_dict(ours.state_dict())
    assert isinstance(ours, nn.Linear) and set(ours.state_dict()) == {"weight", "bias"}
    x = torch.randn(3, 48)
    assert relative_error(ours(x), plain(x)) < 1e-6


@quiet_flags
def test_uae_dit_gradients_agree_with_and_without_onednn():
    torch.manual_seed(0)
    model = UAEDiT.from_preset("DiT-tiny", sample_size=8, patch_size=2, in_channels=4, num_classes=10,
                               use_swiglu=False, use_rmsnorm=False, use_rope=False)
    for parameter in model.parameters():  # adaLN-Zero starts at zero; give every path a gradient
        nn.init.normal_(parameter, std=0.05)
    model.eval()  # no label dropout: both passes see the same labels
    sample, timestep, labels = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 7])

    def velocity_and_grads():
        model.zero_grad()
        velocity = model(sample, timestep, labels).sample
        velocity.pow(2).sum().backward()
        return velocity.detach(), [p.grad.clone() for p in model.parameters()]

    velocity, grads = velocity_and_grads()
    with torch.backends.mkldnn.flags(enabled=False):
        velocity_ref, grads_ref = velocity_and_grads()
    assert relative_error(velocity, velocity_ref) < 1e-5
    assert all(relative_error(g, r) < 1e-4 for g, r in zip(grads, grads_ref, strict=True))
