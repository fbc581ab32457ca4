"""UAEDiTPipeline: reload in a fresh process, determinism, class names, output types, guidance, bad input."""

import json
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


def test_step_previews_decode_the_clean_latent_each_step_points_at():
    """One clock, Euler: the preview after step i decodes x_i - t_i v(x_i, t_i), v the transformer's velocity."""
    pipe = tiny_pipeline()
    pipe.register_modules(scheduler=FlowMatchBandScheduler(latent_dim=64 * 8 * 8, num_bands=4, solver="euler"))
    states = [pipe.prepare_latents(2, "cpu", seeded())]
    out = pipe(class_labels=[5, 9], num_inference_steps=8, generator=seeded(), output_type="pt",
               return_band_previews=True, callback_on_step_end=lambda p, i, t, kw: states.append(kw["latents"]) or kw)
    grid = pipe.scheduler.time_grid
    shown = [0, 2, 4, 5, 7]  # NUM_STEP_PREVIEWS = 5 evenly spaced steps of 8, the last included
    assert out.step_preview_times == pytest.approx([grid[i + 1].item() for i in shown])
    labels = torch.tensor([5, 9])
    for preview, i in zip(out.step_previews, shown, strict=True):
        t = grid[i].expand(2)
        with torch.no_grad():
            clean = states[i] - grid[i] * pipe.transformer(states[i], t, labels).sample
            expected = (pipe.vae.decode(clean).sample / 2 + 0.5).clamp(0, 1)
        assert torch.allclose(preview, expected, atol=1e-4)
    assert torch.allclose(out.step_previews[-1], out.images, atol=2e-2)  # the last step ends at t ~ 0


def test_step_previews_of_staggered_band_clocks(pipe):
    """Compressed band clocks (the fixture's): one finite preview per step of 3, times falling; tuple output too."""
    out = pipe(class_labels=[1], num_inference_steps=3, generator=seeded(), output_type="pt", return_band_previews=True)
    assert len(out.step_previews) == 3 and out.step_preview_times == sorted(out.step_preview_times, reverse=True)
    assert all(p.shape == out.images.shape and p.isfinite().all() for p in out.step_previews)
    images, bands, steps, times = pipe(class_labels=[1], num_inference_steps=3, generator=seeded(), output_type="pt",
                                       return_band_previews=True, return_dict=False)
    assert torch.equal(steps[-1], out.step_previews[-1]) and times == out.step_preview_times


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
        (dict(class_labels=[1000]), "class label 1000 out of range"),
        (dict(class_labels=[3, -1]), "class label -1 out of range"),
        (dict(class_labels=[1.5]), r"class_labels\[0\] = 1.5 is neither an integer"),
        (dict(class_labels=torch.tensor([2.0, 3.0])), r"class_labels\[0\] = 2.0 is neither an integer"),
        (dict(class_labels=[1, True]), r"class_labels\[1\] = True"),
        (dict(class_labels=["tench", "no such class"]), r"unknown class name\(s\) \['no such class'\]"),
        (dict(class_labels=[]), "empty"),
        (dict(class_labels=[1], latents=torch.zeros(1, 64, 4, 4)), "latents must have shape"),
        (dict(class_labels=[1, 2], latents=torch.zeros(1, 64, 8, 8)), "latents must have shape"),
        (dict(class_labels=[1], num_inference_steps=0), "num_inference_steps must be an integer >= 1, got 0"),
        (dict(class_labels=[1], num_inference_steps=2.5), "num_inference_steps must be an integer >= 1, got 2.5"),
        (dict(class_labels=[1], output_type="jpeg"), "output_type"),
        (dict(class_labels=[1], output_type="latent", return_band_previews=True), "band previews"),
        (dict(class_labels=[1], guidance="autoguidance"), "guide_transformer"),
        (dict(class_labels=[1], guidance="pag"), "guidance must be one of"),
        (dict(class_labels=[1], guidance_scale=float("nan")), "guidance_scale must be a finite number, got nan"),
        (dict(class_labels=[1], guidance_scale=float("inf")), "guidance_scale must be a finite number, got inf"),
        (dict(class_labels=[1], guidance_scale=4.0, guidance_interval=(0.0, float("nan"))),
         r"guidance_interval .* got \(0.0, nan\)"),
        (dict(class_labels=[1], guidance_interval=(0.8, 0.2)), r"lo <= hi, got \(0.8, 0.2\)"),
        (dict(class_labels=[1], guidance_interval=(0.5,)), r"guidance_interval .* got \(0.5,\)"),
        (dict(class_labels=[1], callback_on_step_end_tensor_inputs=["latents", "noise"]), r"\['noise'\]"),
    ],
)
def test_bad_input_raises_before_any_work(pipe, kwargs, message):
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            pipe(**{"num_inference_steps": 2, **kwargs})
    finally:
        hook.remove()
    assert calls == []  # checked up front (a NaN scale used to run the whole sampler and fail at decode)


def test_cfg_needs_a_transformer_trained_with_label_dropout():
    pipe = tiny_pipeline(num_classes=3)
    pipe.transformer.register_to_config(class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="class_dropout_prob"):
        pipe(class_labels=[1], guidance_scale=2.0, num_inference_steps=1)
    assert pipe(class_labels=[1], num_inference_steps=1, output_type="latent").images.shape == (1, 64, 8, 8)


def test_labels_as_tensor_array_and_names_agree(pipe):
    kwargs = dict(num_inference_steps=2, output_type="latent")
    ids = pipe(class_labels=[207, 3], **kwargs, generator=seeded()).images
    for labels in (torch.tensor([207, 3]), np.array([207, 3]), ["golden retriever", np.int64(3)]):
        assert torch.equal(pipe(class_labels=labels, **kwargs, generator=seeded()).images, ids)
    one = pipe(class_labels=207, **kwargs, generator=seeded()).images
    assert torch.equal(one, pipe(class_labels="Golden Retriever", **kwargs, generator=seeded()).images)


# --------------------------------------------------------------------------------------------------------------
# The denoising loop: callbacks, no host reads, guidance only on the steps that need it
# --------------------------------------------------------------------------------------------------------------


def test_callback_sees_every_step_and_can_replace_the_latents(pipe):
    kwargs = dict(class_labels=[1, 2], num_inference_steps=4, output_type="latent")
    seen, trajectory = [], {}

    def record(p, step_index, timestep, callback_kwargs):
        assert p is pipe and set(callback_kwargs) == {"latents"}
        seen.append((step_index, float(timestep)))
        trajectory[step_index] = callback_kwargs["latents"].clone()
        return {}

    other = pipe(**kwargs, generator=seeded(1), callback_on_step_end=record).images
    assert seen == [(i, float(t)) for i, t in enumerate(pipe.scheduler.timesteps)]
    assert torch.equal(trajectory[3], other)  # the callback runs after the step: the last one sees the result

    def swap(p, step_index, timestep, callback_kwargs):  # continue from the other seed's latents after step 1
        return {"latents": trajectory[1]} if step_index == 1 else {}

    swapped = pipe(**kwargs, generator=seeded(0), callback_on_step_end=swap).images
    assert torch.equal(swapped, other)
    assert not torch.allclose(pipe(**kwargs, generator=seeded(0)).images, other)
    def zero_last(p, step_index, timestep, callback_kwargs):
        assert callback_kwargs == {}  # no tensor inputs asked for
        return {"latents": torch.zeros(2, 64, 8, 8)} if step_index == 3 else {}

    zeroed = pipe(**kwargs, generator=seeded(0), callback_on_step_end_tensor_inputs=[],
                  callback_on_step_end=zero_last).images
    assert torch.equal(zeroed, torch.zeros(2, 64, 8, 8))


def test_diffusers_pipeline_callback_objects(pipe):
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    class Zero(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            if step_index == self.config.cutoff_step_index:
                callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
            return callback_kwargs

    kwargs = dict(class_labels=[1], num_inference_steps=2, output_type="latent", generator=seeded())
    # tensor_inputs come from the callback object, not from callback_on_step_end_tensor_inputs
    out = pipe(**kwargs, callback_on_step_end=MultiPipelineCallbacks([Zero(None, 1)]),
               callback_on_step_end_tensor_inputs=["not checked"]).images
    assert torch.equal(out, torch.zeros(1, 64, 8, 8))
    assert not torch.equal(pipe(**kwargs, callback_on_step_end=Zero(None, 0)).images, out)


HOST_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


@pytest.fixture
def loop_host_reads(monkeypatch):
    """Records every Tensor.item / bool(tensor) / ... (each a device-to-host sync) made inside the denoising loop.

    The loop is the pipeline's ``progress_bar`` iteration; the recorder is armed from its first step to its end, so
    label checks before it and the decode after it are not counted. Returns (install(pipe), reads, steps).
    """
    reads, steps, armed = [], [], [False]
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def recorded(self, *args, _name=name, _original=original, **kwargs):
            if armed[0]:
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, recorded)

    def install(pipe):
        progress_bar = pipe.progress_bar

        def guarded(iterable=None, total=None):
            def loop():
                armed[0] = True
                try:
                    for item in progress_bar(iterable, total):
                        steps.append(item)
                        yield item
                finally:
                    armed[0] = False
            return loop()

        monkeypatch.setattr(pipe, "progress_bar", guarded)

    return install, reads, steps


@pytest.mark.parametrize(
    "solver, guidance, interval",
    [("euler", "cfg", (0.3, 0.9)), ("rk4", "cfg", (0.0, 1.0)), ("heun", "autoguidance", (0.5, 1.0))],
)
def test_denoising_loop_reads_nothing_back_from_the_device(loop_host_reads, solver, guidance, interval):
    install, reads, steps = loop_host_reads
    pipe = tiny_pipeline()
    pipe.register_modules(scheduler=FlowMatchBandScheduler.from_config(pipe.scheduler.config, solver=solver))
    if guidance == "autoguidance":
        pipe.register_modules(guide_transformer=tiny_pipeline().transformer)
    install(pipe)
    callback_steps = []
    out = pipe(class_labels=[1, "tench"], guidance_scale=3.0, guidance_interval=interval, guidance=guidance,
               num_inference_steps=4, generator=seeded(), output_type="np", return_band_previews=True,
               callback_on_step_end=lambda p, i, t, kw: callback_steps.append(i) or kw)
    assert out.images.shape == (2, 32, 32, 3) and np.isfinite(out.images).all()
    assert len(steps) == 4 and callback_steps == [0, 1, 2, 3]  # the recorder was armed over the whole loop
    assert reads == []


def test_the_host_read_recorder_catches_a_sync(loop_host_reads, pipe):
    install, reads, steps = loop_host_reads
    install(pipe)
    pipe(class_labels=[1], num_inference_steps=2, output_type="latent",
         callback_on_step_end=lambda p, i, t, kw: {} if kw["latents"].isfinite().all() else {})
    assert reads == ["__bool__", "__bool__"] and len(steps) == 2
    reads.clear()
    pipe(class_labels=[1], num_inference_steps=2, output_type="pt")  # the decode after the loop is not counted
    assert reads == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_denoising_loop_has_no_cuda_sync():
    pipe = tiny_pipeline().to("cuda")
    progress_bar = pipe.progress_bar

    def sync_checked(iterable=None, total=None):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield from progress_bar(iterable, total)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    pipe.progress_bar = sync_checked
    try:
        for solver in ("euler", "rk4"):
            pipe.register_modules(scheduler=FlowMatchBandScheduler.from_config(pipe.scheduler.config, solver=solver))
            latents = pipe(class_labels=[1, 2], guidance_scale=3.0, guidance_interval=(0.3, 0.9), generator=seeded(),
                           num_inference_steps=4, output_type="latent", callback_on_step_end=lambda *a: {}).images
            assert latents.device.type == "cuda" and torch.isfinite(latents).all()
        with pytest.raises(RuntimeError, match="synchroniz"):  # the mode is on inside the loop
            pipe(class_labels=[1], num_inference_steps=1, output_type="latent",
                 callback_on_step_end=lambda p, i, t, kw: {} if kw["latents"].isfinite().all() else {})
    finally:  # the failed call above leaves its loop suspended, mode still on
        torch.cuda.set_sync_debug_mode("default")


def test_guidance_runs_only_on_the_steps_whose_times_touch_the_interval(pipe):
    batch_sizes = []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    kwargs = dict(class_labels=[3, 4], num_inference_steps=6, output_type="latent")
    try:
        out = pipe(**kwargs, guidance_scale=3.0, guidance_interval=(0.35, 0.8), generator=seeded()).images
    finally:
        hook.remove()
    grid = pipe.scheduler.time_grid.tolist()
    expected = [4 if t >= 0.35 and t_next <= 0.8 else 2 for t, t_next in zip(grid[:-1], grid[1:])]
    assert batch_sizes == expected and 2 in expected and 4 in expected

    # the same sampler written out: Euler, CFG where the evaluation time lies in the interval
    latents = pipe.prepare_latents(2, "cpu", seeded())
    labels, null = torch.tensor([3, 4]), torch.full((2,), 1000)
    for t, t_next in zip(grid[:-1], grid[1:]):
        time = torch.full((2,), t)
        v = pipe.transformer(latents, time, labels).sample
        if 0.35 <= t <= 0.8:
            v_null = pipe.transformer(latents, time, null).sample
            v = v_null + 3.0 * (v - v_null)
        latents = latents + (t_next - t) * v
    torch.testing.assert_close(out, latents, rtol=1e-4, atol=1e-5)


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


def frequency_limited_pipeline(vae_coefficients, model_tokens):
    torch.manual_seed(0)
    vae = AutoencoderUAE.from_preset("tiny", dct_lowpass_coefficients=vae_coefficients).eval()
    transformer = UAEDiT.from_preset("DiT-tiny", in_channels=64, sample_size=8, num_classes=10,
                                     frequency_tokens=model_tokens).eval()
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(0.02 * torch.randn_like(p))
    pipe = UAEDiTPipeline(transformer=transformer, vae=vae, scheduler=FlowMatchBandScheduler(latent_dim=64 * 8 * 8))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("model_tokens", [None, 16])
def test_frequency_limited_latent_samples_stay_low_passed(model_tokens):
    pipe = frequency_limited_pipeline(16, model_tokens)
    starts = []
    latents = pipe(class_labels=[1, 2], num_inference_steps=3, output_type="latent", generator=seeded(),
                   callback_on_step_end=lambda p, i, t, kw: starts.append(kw["latents"]) or {}).images
    assert latents.abs().mean() > 0.1 and (pipe.vae.lowpass(latents, 16) - latents).abs().max() < 1e-5
    # A frequency-token model moves only the low-pass part, so its noise starts low-passed; a spatial model
    # starts from full-band noise as it was trained, and only its result is low-passed.
    high = (starts[0] - pipe.vae.lowpass(starts[0], 16)).abs().max()
    assert (high < 1e-5) if model_tokens else (high > 0.5)


@pytest.mark.parametrize("vae_coefficients,model_tokens", [(None, 16), (32, 16)])
def test_frequency_tokens_must_match_the_latent(vae_coefficients, model_tokens):
    pipe = frequency_limited_pipeline(vae_coefficients, model_tokens)
    with pytest.raises(ValueError, match=f"frequency_tokens={model_tokens}.*dct_lowpass_coefficients={vae_coefficients}"):
        pipe(class_labels=[1], num_inference_steps=2)


def test_shifted_band_clocks_condition_on_band_times_and_mask_drift():
    torch.manual_seed(0)
    vae = AutoencoderUAE.from_preset("tiny").eval()
    transformer = UAEDiT.from_preset("DiT-tiny", in_channels=64, sample_size=8, num_classes=10,
                                     num_time_embeddings=4).eval()
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(0.02 * torch.randn_like(p))
    scheduler = FlowMatchBandScheduler(latent_dim=64 * 8 * 8, num_bands=4, band_stagger=0.3, band_clock="shifted")
    pipe = UAEDiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    transformer.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    start = torch.randn(1, 64, 8, 8, generator=seeded())
    steps = []
    latents = pipe(class_labels=[3], num_inference_steps=4, output_type="latent", latents=start,
                   callback_on_step_end=lambda p, i, t, kw: steps.append(kw["latents"]) or {}).images
    assert seen[0].shape == (1, 4) and seen[0][0].tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0])
    assert scheduler.timesteps[0] == pytest.approx(1.3)
    # the first step runs before bands 1-3 start: only band 0 of the state moves (the smooth band masks overlap
    # their neighbours, so band 1 of the move holds band 0's edge; bands 2 and 3 hold nothing)
    moved = vae.split_bands(steps[0] - start)[0]
    assert moved[0].abs().max() > 1e-2 and moved[2:].abs().max() < 1e-5
    assert torch.isfinite(latents).all()
    # a model with one time embedding does not fit this schedule
    plain = UAEDiTPipeline(transformer=tiny_pipeline().transformer, vae=vae, scheduler=scheduler)
    with pytest.raises(ValueError, match="num_time_embeddings=1 .* schedule gives 4"):
        plain(class_labels=[1], num_inference_steps=2)


def test_set_attention_backend_reaches_transformer_and_guide(monkeypatch):
    guide = UAEDiT.from_preset("DiT-tiny", in_channels=64, sample_size=8, num_classes=1000).eval()
    pipe = tiny_pipeline(guide_transformer=guide)
    with torch.no_grad():
        before = pipe(class_labels=[1], num_inference_steps=2, generator=seeded(), output_type="latent").images
        pipe.set_attention_backend("auto")  # SDPA for CPU tensors
        after = pipe(class_labels=[1], num_inference_steps=2, generator=seeded(), output_type="latent").images
    layers = [block.attn.backend for model in (pipe.transformer, guide) for block in model.blocks]
    assert layers == ["auto"] * 4
    assert torch.equal(after, before) and before.abs().mean() > 0.1
    from uae_gen.models import attention as attention_module
    monkeypatch.setattr(attention_module, "xformers_available", lambda: False)
    with pytest.raises(ImportError, match="optional xformers package"):
        pipe.set_attention_backend("xformers")


@pytest.mark.parametrize("frequency_tokens", [None, 64])
def test_converted_uae_v2_64_coefficient_checkpoint_samples(tmp_path, frequency_tokens):
    """`uae-gen convert --from uae-v2` of the official 64-coefficient recipe (a tiny official state dict, 4x16x16
    latent) samples through the pipeline with a spatial DiT (the official layout) or one on the 64 coefficients."""
    from uae_gen.cli import main as cli_main
    from uae_gen.models.bands import DCTBandTransform

    from .test_convert import TINY_OVERRIDES, official_uae, save_training_checkpoint

    save_training_checkpoint(official_uae("v2", channels=4, grid=16)[0], tmp_path / "ep-last.pt")
    overrides = {**TINY_OVERRIDES, "dct_lowpass_coefficients": 64}
    cli_main(["convert", "--from", "uae-v2", str(tmp_path / "ep-last.pt"), str(tmp_path / "uae"),
              *[arg for key, value in overrides.items() for arg in ("--set", f"{key}={json.dumps(value)}")]])
    vae = AutoencoderUAE.from_pretrained(tmp_path / "uae").eval()
    assert vae.config.dct_lowpass_coefficients == 64 and vae.latent_size == (16, 16)
    torch.manual_seed(0)
    transformer = UAEDiT.from_preset("DiT-tiny", in_channels=4, sample_size=16, num_classes=10,
                                     frequency_tokens=frequency_tokens).eval()
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(0.02 * torch.randn_like(p))
    scheduler = FlowMatchBandScheduler(latent_dim=4 * 16 * 16, num_bands=vae.config.num_bands, solver="rk4")
    UAEDiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    pipe = UAEDiTPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(class_labels=[1, 7], num_inference_steps=3, generator=seeded(), output_type="latent").images
    low = DCTBandTransform(16, 16, cutoffs=[]).lowpass(latents, 64)
    assert latents.shape == (2, 4, 16, 16) and latents.abs().mean() > 0.1 and (low - latents).abs().max() < 1e-5
    images = pipe(class_labels=[1, 7], num_inference_steps=3, generator=seeded(), output_type="np").images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
