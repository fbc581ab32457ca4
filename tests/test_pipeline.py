"""UAEDiTPipeline: reload in a fresh process, determinism, class names, output types, guidance, bad input."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from uae_gen import AutoencoderUAE, FlowMatchBandScheduler, UAEDiT, UAEDiTPipeline


def tiny_pipeline(num_classes=1000, **pipe_kwargs):
    torch.manual_seed(0)
    vae = AutoencoderUAE.from_preset("tiny").eval()
    transformer = UAEDiT.from_preset("DiT-tiny", in_channels=64, sample_size=8, num_classes=num_classes).eval()
    # adaLN-Zero starts at exactly zero velocity; perturb so samples depend on labels and noise.
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(0.02 * torch.randn_like(p))
    scheduler = FlowMatchBandScheduler(latent_dim=64 * 8 * 8, num_bands=4, band_stagger=0.3)
    pipe = UAEDiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, **pipe_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def test_reload_in_a_new_process_and_sample(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    script = f"""
import numpy as np, torch
from uae_gen import UAEDiTPipeline
pipe = UAEDiTPipeline.from_pretrained(r"{tmp_path / 'pipe'}")
pipe.set_progress_bar_config(disable=True)
image = pipe(class_labels=[207], num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]
again = pipe(class_labels=["golden retriever"], num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]
assert image.size == (32, 32), image.size
np.save(r"{tmp_path / 'a.npy'}", np.asarray(image))
np.save(r"{tmp_path / 'b.npy'}", np.asarray(again))
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)  # same seed, and the name resolves to the same class as 207
    here = np.asarray(pipe(class_labels=[207], num_inference_steps=4, generator=seeded()).images[0])
    assert np.array_equal(a, here)


def test_same_seed_same_pixels_other_seed_differs(pipe):
    a = pipe(class_labels=[1, 2], num_inference_steps=3, generator=seeded(0), output_type="np").images
    b = pipe(class_labels=[1, 2], num_inference_steps=3, generator=seeded(0), output_type="np").images
    c = pipe(class_labels=[1, 2], num_inference_steps=3, generator=seeded(1), output_type="np").images
    assert a.shape == (2, 32, 32, 3) and 0 <= a.min() and a.max() <= 1
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_output_types_agree(pipe):
    kwargs = dict(class_labels=[3], num_inference_steps=2)
    latent = pipe(**kwargs, generator=seeded(), output_type="latent").images
    tensor = pipe(**kwargs, generator=seeded(), output_type="pt").images
    assert latent.shape == (1, 64, 8, 8)
    expected = (pipe.vae.decode(latent).sample / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(tensor, expected, atol=1e-6)


def test_band_previews_end_with_the_full_image(pipe):
    out = pipe(class_labels=[5], num_inference_steps=2, generator=seeded(), output_type="pt", return_band_previews=True)
    assert len(out.band_previews) == 4
    assert torch.allclose(out.band_previews[-1], out.images, atol=1e-5)
    assert not torch.allclose(out.band_previews[0], out.images, atol=1e-3)


def test_cfg_scale_one_is_conditional_and_guidance_changes_samples(pipe):
    kwargs = dict(class_labels=[7], num_inference_steps=3, output_type="latent")
    plain = pipe(**kwargs, generator=seeded()).images
    scale_one = pipe(**kwargs, guidance_scale=1.0, generator=seeded()).images
    guided = pipe(**kwargs, guidance_scale=4.0, generator=seeded()).images
    outside = pipe(**kwargs, guidance_scale=4.0, guidance_interval=(2.0, 3.0), generator=seeded()).images
    assert torch.equal(plain, scale_one)
    assert not torch.allclose(plain, guided)
    assert torch.equal(plain, outside)  # guidance only inside its interval


def test_autoguidance_with_itself_is_unguided():
    pipe = tiny_pipeline()
    pipe.register_modules(guide_transformer=pipe.transformer)
    kwargs = dict(class_labels=[4], num_inference_steps=3, output_type="latent")
    unguided = pipe(**kwargs, generator=seeded()).images
    self_guided = pipe(**kwargs, guidance="autoguidance", guidance_scale=1.5, generator=seeded()).images
    assert torch.allclose(unguided, self_guided, atol=1e-6)


def test_custom_id2label_travels_with_the_pipeline(tmp_path):
    pipe = tiny_pipeline(num_classes=3, id2label={0: "zero", 1: "one, uno", 2: "two"})
    pipe.save_pretrained(tmp_path)
    loaded = UAEDiTPipeline.from_pretrained(tmp_path)
    assert loaded.id2label == {0: "zero", 1: "one, uno", 2: "two"}
    assert loaded.get_label_ids(["UNO", "two"]) == [1, 2]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(class_labels=[1000]), "out of range"),
        (dict(class_labels=[-1]), "out of range"),
        (dict(class_labels=["no such class"]), "unknown class"),
        (dict(class_labels=[]), "empty"),
        (dict(class_labels=[1], latents=torch.zeros(1, 64, 4, 4)), "latents must have shape"),
        (dict(class_labels=[1, 2], latents=torch.zeros(1, 64, 8, 8)), "latents must have shape"),
        (dict(class_labels=[1], num_inference_steps=0), "num_inference_steps"),
        (dict(class_labels=[1], output_type="jpeg"), "output_type"),
        (dict(class_labels=[1], guidance="autoguidance"), "guide_transformer"),
    ],
)
def test_bad_input_raises(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(**{"num_inference_steps": 2, **kwargs})


def test_cli_generate_writes_a_grid(pipe, tmp_path):
    from PIL import Image

    from uae_gen.cli import main

    pipe.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "grid.png"
    main(["generate", "--pipeline", str(tmp_path / "pipe"), "--class-labels", "3", "golden retriever",
          "--steps", "2", "--out", str(out)])
    assert Image.open(out).size[1] >= 32 and Image.open(out).size[0] >= 64
    with pytest.raises(SystemExit):
        main(["generate", "--pipeline", str(tmp_path / "pipe"), "--class-labels", "5000", "--out", str(out)])
