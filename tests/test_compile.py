"""torch.compile: UAEDiT (plain DiT and DiT^DH, with and without frequency tokens) and AutoencoderUAE trace as one
graph with no graph break (what the scripts' --compile, fullgraph=True, needs), and a compiled model computes what
the eager one does. The compiled-equality tests run inductor on the CPU, which compiles slowly (with an empty
inductor cache on the shared 2-core build machine: 38 s for the DiT, 14 s for the autoencoder), so there are only two
of them."""

import pytest
import torch
import torch._dynamo

from uae_gen.models.autoencoder_uae import AutoencoderUAE
from uae_gen.models.dit import UAEDiT, apply_rope, rope_tables_2d
from uae_gen.training import compile_module

TINY = dict(sample_size=8, in_channels=4, num_classes=10)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # no compiled code or recompilation count carried between tests
    yield
    torch._dynamo.reset()


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, so no zero-initialised layer hides a difference."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def dit_inputs(model: UAEDiT, batch: int = 3):
    generator = torch.Generator().manual_seed(1)
    config = model.config
    sample = torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    times = (batch,) if config.num_time_embeddings == 1 else (batch, config.num_time_embeddings)
    return sample, torch.rand(times, generator=generator), torch.randint(0, config.num_classes, (batch,),
                                                                          generator=generator)


def assert_one_graph(fn, *inputs):
    explanation = torch._dynamo.explain(fn)(*inputs)
    reasons = [str(b.reason)[:300] for b in explanation.break_reasons]
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), reasons
    assert explanation.op_count > 10  # something was traced


@pytest.mark.parametrize("frequency_tokens", [None, 16])
@pytest.mark.parametrize("preset", ["DiT-tiny", "DiT-DH-tiny"])
def test_dit_traces_without_graph_breaks(preset, frequency_tokens):
    model = UAEDiT.from_preset(preset, frequency_tokens=frequency_tokens, **TINY)
    inputs = dit_inputs(model)
    assert_one_graph(model.train(), *inputs)  # label dropout draws on the device; with grad
    torch._dynamo.reset()
    with torch.no_grad():
        assert_one_graph(model.eval(), *inputs)
    torch._dynamo.reset()
    model.train().enable_gradient_checkpointing()  # checkpointed blocks trace as well (--gradient_checkpointing)
    assert_one_graph(model, *inputs)


def test_dit_with_band_time_embeddings_traces_without_graph_breaks():
    model = UAEDiT.from_preset("DiT-DH-tiny", num_time_embeddings=4, **TINY).train()
    assert_one_graph(model, *dit_inputs(model))


def test_autoencoder_traces_without_graph_breaks():
    vae = AutoencoderUAE.from_preset("tiny").eval()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert_one_graph(lambda x: vae.encode(x).latent, images)
        torch._dynamo.reset()
        assert_one_graph(lambda z: vae.decode(z).sample, torch.randn(2, 64, 8, 8))
    # The ViTs the tokenizer trainer compiles, in training mode with gradient checkpointing.
    vae.train().enable_gradient_checkpointing()
    vae.encoder.backbone.set_grad_checkpointing(True)
    for module, x in ((vae.encoder, images), (vae.decoder, torch.randn(2, 64, 8, 8))):
        torch._dynamo.reset()
        assert_one_graph(module, x)


def test_rope_has_the_same_values_in_its_compiled_form(monkeypatch):
    """Under torch.compile apply_rope multiplies in real arithmetic (inductor has no complex kernels); in fp32 the
    result is bit for bit the complex product's."""
    cos, sin = rope_tables_2d(16, 8)
    x = torch.randn(2, 4, 64, 16, generator=torch.Generator().manual_seed(0))
    eager = apply_rope(x, cos, sin)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.equal(apply_rope(x, cos, sin), eager)
    assert not torch.equal(eager, x)


def test_compiled_dit_matches_eager():
    """Inductor (the scripts' --compile) on DiT^DH with RoPE and frequency tokens: same velocity to 1e-5 in fp32."""
    eager = perturbed(UAEDiT.from_preset("DiT-DH-tiny", frequency_tokens=16, **TINY)).eval()
    compiled = perturbed(UAEDiT.from_preset("DiT-DH-tiny", frequency_tokens=16, **TINY)).eval()
    compiled.load_state_dict(eager.state_dict())
    compile_module(compiled)
    sample, timestep, labels = dit_inputs(eager)
    with torch.no_grad():
        expected = eager(sample, timestep, labels).sample
        out = compiled(sample, timestep, labels).sample
        other = compiled(sample * 0.5, timestep.flip(0), labels).sample  # the compiled code, not a cached result
    assert expected.abs().max() > 1e-2
    assert (out - expected).abs().max().item() < 1e-5
    assert (other - eager(sample * 0.5, timestep.flip(0), labels).sample).abs().max().item() < 1e-5
    assert list(compiled.state_dict()) == list(eager.state_dict())  # compiled in place: same keys, same object


def test_compiled_autoencoder_matches_eager():
    """The encoder and decoder ViTs compiled as train_tokenizer --compile does: encode and decode to 1e-5."""
    torch.manual_seed(0)
    vae = perturbed(AutoencoderUAE.from_preset("tiny")).eval()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latent = vae.encode(images).latent
        decoded = vae.decode(latent).sample
        compile_module(vae.encoder)
        compile_module(vae.decoder)
        compiled_latent = vae.encode(images).latent
        compiled_decoded = vae.decode(latent).sample
    assert latent.abs().max() > 1e-2 and decoded.abs().max() > 1e-2
    assert (compiled_latent - latent).abs().max().item() < 1e-5
    assert (compiled_decoded - decoded).abs().max().item() < 1e-5
