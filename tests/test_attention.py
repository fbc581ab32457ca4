"""The single attention entry point: SDPA against a hand computation, backend selection and errors."""

import math
import sys
import types

import pytest
import torch

from uae_gen.models import attention as attention_module
from uae_gen.models.attention import attention, check_attention_backend_available
from uae_gen.models.dit import SelfAttention, UAEDiT


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


def attention_backends(model: UAEDiT) -> list:
    return [module.backend for module in model.modules() if isinstance(module, SelfAttention)]


def test_set_attention_backend_reaches_every_layer_and_keeps_the_config(tmp_path):
    model = UAEDiT.from_preset("DiT-DH-tiny", sample_size=4, in_channels=4, num_classes=3).eval()
    for parameter in model.parameters():  # no zero-initialised layer may hide a difference
        torch.nn.init.normal_(parameter, std=0.1)
    sample, labels = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 2])
    with torch.no_grad():
        sdpa = model(sample, 0.4, labels).sample
        model.set_attention_backend("auto")  # SDPA on CPU tensors
        auto = model(sample, 0.4, labels).sample
    assert attention_backends(model) == ["auto"] * 3  # two trunk blocks and the head block
    assert (auto - sdpa).abs().max().item() < 1e-6 and sdpa.abs().max().item() > 1e-3
    assert model.config.attention_backend == "sdpa"  # a runtime choice, not saved
    model.save_pretrained(tmp_path)
    assert attention_backends(UAEDiT.from_pretrained(tmp_path)) == ["sdpa"] * 3
    with pytest.raises(ValueError, match="Unknown attention backend 'flash'"):
        model.set_attention_backend("flash")
    assert attention_backends(model) == ["auto"] * 3  # a refused name changes nothing


def test_set_attention_backend_xformers_fails_at_once_without_the_package(monkeypatch):
    monkeypatch.setattr(attention_module, "xformers_available", lambda: False)
    model = UAEDiT.from_preset("DiT-tiny", sample_size=4, in_channels=4, num_classes=3)
    with pytest.raises(ImportError, match="optional xformers package"):
        model.set_attention_backend("xformers")
    with pytest.raises(ImportError, match="optional xformers package"):
        model.enable_xformers_memory_efficient_attention()  # diffusers' spelling reaches the same check
    assert attention_backends(model) == ["sdpa"] * 2


def test_xformers_check_names_the_device(monkeypatch):
    monkeypatch.setattr(attention_module, "xformers_available", lambda: True)  # as if installed
    check_attention_backend_available("xformers", "cuda")  # accepted for a CUDA run
    with pytest.raises(ValueError, match="CUDA-only kernels but the run is on cpu"):
        check_attention_backend_available("xformers", "cpu")
    model = UAEDiT.from_preset("DiT-tiny", sample_size=4, in_channels=4, num_classes=3)
    model.enable_xformers_memory_efficient_attention()
    assert attention_backends(model) == ["xformers"] * 2
    model.disable_xformers_memory_efficient_attention()
    assert attention_backends(model) == ["sdpa"] * 2
