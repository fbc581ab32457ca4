"""The single attention entry point: SDPA against a hand computation, backend selection and errors."""

import math
import sys
import types

import pytest
import torch

from uae_gen.models.attention import attention
from uae_gen.models.dit import UAEDiT


def reference_attention(q, k, v):
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ v


@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_matches_manual_softmax_attention(backend):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 37, 16, generator=generator) for _ in range(3))
    out = attention(q, k, v, backend=backend)
    assert out.shape == (2, 4, 37, 16)
    assert (out - reference_attention(q, k, v)).abs().max().item() < 1e-5


def test_unknown_backend_is_rejected():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="Unknown attention backend 'flash'"):
        attention(q, q, q, backend="flash")


def test_xformers_missing_raises_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # makes `import xformers` fail
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ImportError, match="optional xformers package"):
        attention(q, q, q, backend="xformers")


def test_xformers_on_cpu_raises_value_error(monkeypatch):
    # An installed xformers (faked here) still has CUDA-only kernels: CPU tensors are refused up front.
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = lambda *args: pytest.fail("xformers kernel must not be called on CPU")
    package = types.ModuleType("xformers")
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="CUDA-only"):
        attention(q, q, q, backend="xformers")


def test_model_with_xformers_backend_on_cpu_raises():
    model = UAEDiT.from_preset("DiT-tiny", sample_size=4, in_channels=4, num_classes=3, attention_backend="xformers")
    with pytest.raises((ImportError, ValueError), match="xformers"):
        model(torch.randn(1, 4, 4, 4), 0.5, torch.tensor([1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_backend_on_cuda_matches_reference():
    q, k, v = (torch.randn(2, 4, 64, 32, device="cuda") for _ in range(3))
    out = attention(q, k, v, backend="auto")
    assert (out - reference_attention(q, k, v)).abs().max().item() < 1e-3  # TF32/fused kernels on GPU
