"""uae_gen/scripts/train_dit.py: exact resume in a new process after a crash mid-checkpoint, two real ranks, the loss
going down, the final pipeline, the sample grid, cache vs on-the-fly data, and the flags."""

import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from uae_gen.pipelines.pipeline_uae_dit import UAEDiTPipeline

from uae_gen.data import load_demo_digits
from uae_gen.models.autoencoder_uae import AutoencoderUAE
from uae_gen.models.dit import UAEDiT
from uae_gen.scripts import cache_latents, train_dit
from uae_gen.training import checkpointing, find_latest_checkpoint

from .file_modes import unreadable_entries

REPO = Path(__file__).resolve().parents[1]
TRAIN_DIT = REPO / "train" / "train_dit.py"  # the checkout's shim, run as a subprocess
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny random-weight UAE, a latent cache of 48 demo digits, and an ImageFolder of 24 of them."""
    root = tmp_path_factory.mktemp("train_dit")
    torch.manual_seed(0)
    AutoencoderUAE.from_preset("tiny").save_pretrained(root / "vae")
    cache_latents.main(cache_latents.parse_args([
        "--vae", str(root / "vae"), "--dataset", "demo-digits", "--output_dir", str(root / "cache"),
        "--max_samples", "48", "--batch_size", "48"]))
    return root


def tiny_args(data, output_dir, *extra):
    return ["--config", "dit_tiny", "--latent_cache", str(data / "cache"), "--output_dir", str(output_dir),
            "--train_batch_size", "8", "--validation_steps", "1000", *extra]


# dit_tiny's DiT runs on frequency tokens; these flags give the spatial DiT (one token per latent cell).
SPATIAL = ("--latent_lowpass", "none", "--no-frequency_tokens", "--coefficients_per_token", "1")


def spatial_args(data, output_dir, *extra):
    return tiny_args(data, output_dir, *SPATIAL, *extra)


def lowpass_statistics(data, num_coefficients):
    """Per-channel mean and std of the cache's latents low-passed to their first N coefficients, by hand."""
    cache = AutoencoderUAE.from_pretrained(data / "cache" / "autoencoder")
    raw = torch.cat([part["latents"] for part in map(load_file, sorted((data / "cache").glob("part-*.safetensors")))])
    low = cache.lowpass(raw.float(), num_coefficients)
    return low.mean((0, 2, 3)), (low.var((0, 2, 3), unbiased=False) + 1e-5).sqrt()


def transformer_weights(checkpoint_dir, name):
    return load_file(os.path.join(checkpoint_dir, name, "diffusion_pytorch_model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_crash_mid_checkpoint_then_new_process_resumes_bit_identically(data, tmp_path, monkeypatch):
    # 48 samples, batch 8, accumulation 2: 3 steps per epoch, so the resume at step 4 is mid-epoch 1. The loss is
    # logged every 2 steps, so both runs log the same last window (steps 7-8).
    common = ["--max_train_steps", "8", "--checkpointing_steps", "4", "--gradient_accumulation_steps", "2",
              "--ema_decay", "0.5", "--logging_steps", "2"]
    uninterrupted = tmp_path / "uninterrupted"
    train_dit.main(train_dit.parse_args(tiny_args(data, uninterrupted, *common)))

    # Run 2 crashes between writing checkpoint-8 and renaming it into place.
    interrupted = tmp_path / "interrupted"
    rename = os.rename

    def crash_on_checkpoint_8(source, destination):
        if os.path.basename(destination) == "checkpoint-8":
            raise OSError("simulated kill")
        rename(source, destination)

    with monkeypatch.context() as patch:
        patch.setattr(checkpointing.os, "rename", crash_on_checkpoint_8)
        with pytest.raises(OSError, match="simulated kill"):
            train_dit.main(train_dit.parse_args(tiny_args(data, interrupted, *common)))
    assert (interrupted / ".tmp-checkpoint-8" / "transformer").is_dir()
    assert find_latest_checkpoint(str(interrupted)) == str(interrupted / "checkpoint-4")
    loaded = UAEDiT.from_pretrained(interrupted / "checkpoint-4" / "transformer")
    assert_same_weights(loaded.state_dict(), UAEDiT.from_pretrained(uninterrupted / "checkpoint-4" / "transformer")
                        .state_dict())

    # A NEW process resumes from `latest` (checkpoint-4) and reaches step 8 with bit-identical weights.
    command = [sys.executable, str(TRAIN_DIT), *tiny_args(data, interrupted, *common),
               "--resume_from_checkpoint", "latest"]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((interrupted / "training_summary.json").read_text())
    assert summary["resumed_from"] == str(interrupted / "checkpoint-4") and summary["global_step"] == 8
    assert not (interrupted / ".tmp-checkpoint-8").exists()
    for name in ("transformer", "transformer_ema"):
        assert_same_weights(transformer_weights(interrupted / "checkpoint-8", name),
                            transformer_weights(uninterrupted / "checkpoint-8", name))
    reference = json.loads((uninterrupted / "training_summary.json").read_text())
    assert summary["weights_sha256_per_rank"] == reference["weights_sha256_per_rank"]
    assert summary["loss"]["curve"][-1] == reference["loss"]["curve"][-1]  # same last logged loss


def test_two_real_ranks_train_in_sync(data, tmp_path):
    """ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 (not --cpu, which runs one process)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    output_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), str(TRAIN_DIT),
               *tiny_args(data, output_dir, "--train_batch_size", "4", "--max_train_steps", "4",
                          "--checkpointing_steps", "2", "--validation_steps", "2", "--num_validation_images", "2",
                          "--validation_num_inference_steps", "2")]
    result = subprocess.run(command, env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((output_dir / "training_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 4 and summary["global_batch_size"] == 8
    hashes = summary["weights_sha256_per_rank"]
    assert len(hashes) == 2 and hashes[0] == hashes[1] and hashes[0]["ema"] is not None
    files = set(os.listdir(output_dir / "checkpoint-4"))
    assert {"random_states_0.pkl", "random_states_1.pkl", "transformer", "transformer_ema"} <= files
    assert (output_dir / "samples" / "step-0000004.png").is_file()


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """150 steps of dit_tiny's DiT (frequency tokens) on the cached digits, with sample grids every 75 steps."""
    output_dir = tmp_path_factory.mktemp("loss") / "run"
    summary = train_dit.main(train_dit.parse_args(tiny_args(
        data, output_dir, "--train_batch_size", "16", "--max_train_steps", "150", "--checkpointing_steps", "150",
        "--validation_steps", "75", "--validation_num_inference_steps", "4")))
    return output_dir, summary


# measured 1.44-1.47 after 150 steps (first-tenth mean / last-tenth mean, seeds 0-2; the spatial DiT: 2.09-2.15)
LOSS_FACTOR = 1.3


def test_loss_goes_down_by_a_stated_factor(trained):
    _, summary = trained
    loss = summary["loss"]
    # Logged every 10 steps (the default --logging_steps): 15 points, a tenth of them is one.
    assert summary["global_step"] == 150 and loss["window"] == 1 and len(loss["curve"]) == 15
    assert [step for step, _ in loss["curve"]] == list(range(10, 151, 10))
    assert loss["first"] > 1.5  # a zero-initialised output layer starts near E|eps - x|^2 = 2
    assert loss["first"] / loss["last"] > LOSS_FACTOR, loss


def test_final_pipeline_loads_and_samples_with_the_ema_weights(data, trained):
    output_dir, _ = trained
    assert unreadable_entries(output_dir) == []  # pipeline, checkpoints, grids: all readable by other users
    pipe = UAEDiTPipeline.from_pretrained(output_dir / "pipeline")
    assert pipe.id2label[7] == "digit 7" and pipe.scheduler.time_shift == 2.0  # dit_tiny's, not the dimension rule
    # dit_tiny: all 64 DCT coefficients of the 8x8 latent, four per token (16 tokens).
    assert (pipe.transformer.config.frequency_tokens, pipe.transformer.config.coefficients_per_token) == (64, 4)
    assert_same_weights(pipe.transformer.state_dict(),
                        UAEDiT.from_pretrained(output_dir / "checkpoint-150" / "transformer_ema").state_dict())
    mean, std = lowpass_statistics(data, 64)  # decodes with the training statistics: per channel, as trained
    assert torch.allclose(pipe.vae.latents_mean.flatten(), mean, atol=1e-5)
    assert torch.allclose(pipe.vae.latents_std.flatten(), std, rtol=1e-4)
    images = pipe(class_labels=["digit 1", 2], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0
    grid = Image.open(output_dir / "samples" / "step-0000150.png")
    assert grid.size[0] > 4 * 32 and (output_dir / "samples" / "step-0000075.png").is_file()


def test_images_on_the_fly_match_the_cache(data, tmp_path):
    """The same images through --train_data_dir (encoded every step) and through a latent cache of them give the
    same losses: one normalisation, one data order."""
    folder = tmp_path / "images"
    digits = load_demo_digits("train", image_size=32)
    for index in range(24):
        class_dir = folder / f"class_{int(digits.labels[index])}"
        class_dir.mkdir(parents=True, exist_ok=True)
        pixels = ((digits.images[index] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(class_dir / f"{index}.png")
    cache_latents.main(cache_latents.parse_args(["--vae", str(data / "vae"), "--train_data_dir", str(folder),
                                                 "--output_dir", str(tmp_path / "cache")]))
    common = ["--max_train_steps", "3", "--no-random_flip", "--checkpointing_steps", "100", "--logging_steps", "1"]
    from_cache = train_dit.main(train_dit.parse_args([
        "--config", "dit_tiny", "--latent_cache", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "a"),
        "--train_batch_size", "8", *common]))
    on_the_fly = train_dit.main(train_dit.parse_args([
        "--config", "dit_tiny", "--train_data_dir", str(folder), "--vae", str(tmp_path / "cache" / "autoencoder"),
        "--output_dir", str(tmp_path / "b"), "--train_batch_size", "8", *common]))
    losses = [[loss for _, loss in run["loss"]["curve"]] for run in (from_cache, on_the_fly)]
    assert len(losses[0]) == 3
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=1e-5)


def test_flags_presets_and_overrides(data, tmp_path):
    args = train_dit.parse_args(["--config", "dit_imagenet256", "--latent_cache", "somewhere", "--use_ema"])
    assert (args.model, args.learning_rate, args.lr_end, args.ema_decay) == ("DiT-DH-XL", 2e-4, 2e-5, 0.9995)
    assert (args.lr_scheduler, args.lr_warmup_epochs, args.lr_warmup_from_zero) == ("linear", 40, False)
    assert (args.adam_beta2, args.num_train_epochs, args.time_shift, args.id2label) == (0.95, 800, "auto", "imagenet")
    tiny = train_dit.parse_args(["--config", "dit_tiny", "--latent_cache", "somewhere"])
    assert (tiny.latent_lowpass, tiny.frequency_tokens, tiny.coefficients_per_token) == (64, True, 4)
    spatial = train_dit.parse_args(["--config", "dit_tiny", "--latent_cache", "somewhere", *SPATIAL])
    assert (spatial.latent_lowpass, spatial.frequency_tokens, spatial.coefficients_per_token) == (None, False, 1)
    lowpass64 = train_dit.parse_args(["--config", "dit_imagenet256_lowpass64", "--latent_cache", "somewhere"])
    assert (lowpass64.latent_lowpass, lowpass64.frequency_tokens, lowpass64.coefficients_per_token) == (64, True, 1)
    assert lowpass64.solver == "rk4" and {k: v for k, v in vars(lowpass64).items() if getattr(args, k) != v} == {
        "latent_lowpass": 64, "frequency_tokens": True, "solver": "rk4", "config": lowpass64.config}
    latent = types.SimpleNamespace(latent_channels=768, latent_size=(16, 16))
    with torch.device("meta"):
        transformer = train_dit.make_transformer(lowpass64, latent, 1000, num_model_times=1)
    assert transformer.pos_embed.shape == (1, 64, 1152)  # 64 tokens instead of 16 x 16
    args = train_dit.parse_args(["--config", "dit_tiny", "--vae", "v", "--learning_rate", "0.5", "--time_shift", "2",
                                 "--no-use_ema"])
    assert (args.dataset, args.learning_rate, args.time_shift, args.use_ema) == ("demo-digits", 0.5, 2.0, False)
    # A data source on the command line replaces the preset's.
    args = train_dit.parse_args(["--config", "dit_tiny", "--latent_cache", "c"])
    assert args.dataset is None and args.latent_cache == "c"

    bad_preset = tmp_path / "bad.json"
    bad_preset.write_text(json.dumps({"learning_rate": 1e-4, "lr_schedule": "linear"}))
    with pytest.raises(ValueError, match="unknown or forbidden keys \\['lr_schedule'\\]"):
        train_dit.parse_args(["--config", str(bad_preset), "--latent_cache", "c"])
    bad_preset.write_text(json.dumps({"lr_scheduler": "exponential"}))
    with pytest.raises(ValueError, match="--lr_scheduler: invalid choice: 'exponential'"):
        train_dit.parse_args(["--config", str(bad_preset), "--latent_cache", "c"])
    with pytest.raises(FileNotFoundError, match="config 'nope' not found"):
        train_dit.parse_args(["--config", "nope", "--latent_cache", "c"])
    with pytest.raises(ValueError, match="exactly one data source"):
        train_dit.parse_args(["--latent_cache", "c", "--dataset", "demo-digits"])
    with pytest.raises(ValueError, match="--vae"):
        train_dit.parse_args(["--dataset", "demo-digits"])
    with pytest.raises(ValueError, match="lr_end"):
        train_dit.parse_args(["--latent_cache", "c", "--lr_end", "1.0"])
    with pytest.raises(SystemExit):
        train_dit.parse_args(["--latent_cache", "c", "--time_shift", "-1"])

    # A --vae whose statistics differ from the cache's would decode with the wrong normalisation.
    with pytest.raises(ValueError, match="normalises latents differently"):
        train_dit.main(train_dit.parse_args(tiny_args(data, tmp_path / "run", "--vae", str(data / "vae"))))
    with pytest.raises(ValueError, match="--id2label"):
        train_dit.main(train_dit.parse_args(tiny_args(data, tmp_path / "run", "--id2label", "imagenet")))


def test_frequency_limited_latent_with_frequency_tokens(data, tmp_path):
    out = tmp_path / "lowpass"
    train_dit.main(train_dit.parse_args(tiny_args(data, out, "--max_train_steps", "2", "--latent_lowpass", "16",
                                                  "--frequency_tokens")))
    pipe = UAEDiTPipeline.from_pretrained(out / "pipeline")
    assert pipe.vae.config.dct_lowpass_coefficients == 16 and pipe.transformer.config.frequency_tokens == 16
    mean, std = lowpass_statistics(data, 16)
    assert torch.allclose(pipe.vae.latents_mean.flatten(), mean, atol=1e-5)
    assert torch.allclose(pipe.vae.latents_std.flatten(), std, rtol=1e-4)
    latents = pipe(class_labels=[0, 3], num_inference_steps=2, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    assert latents.abs().mean() > 0.1 and (pipe.vae.lowpass(latents, 16) - latents).abs().max() < 1e-5


def test_lowpass_curriculum_grows_the_learned_coefficients(data, tmp_path):
    schedule = [(0, 16), (2, 25), (4, 32)]
    assert [train_dit.lowpass_count(schedule, step) for step in range(6)] == [16, 16, 25, 25, 32, 32]

    def losses(name, *extra):
        summary = train_dit.main(train_dit.parse_args(spatial_args(
            data, tmp_path / name, "--max_train_steps", "2", "--logging_steps", "1", "--latent_lowpass", "32", *extra)))
        return [loss for _, loss in summary["loss"]["curve"]]

    plain = losses("plain")
    # A single stage is the plain low-pass (projected once more: float rounding only); 16 coefficients first differ.
    assert losses("one-stage", "--lowpass_schedule", "32@0") == pytest.approx(plain, rel=1e-6)
    curriculum = losses("curriculum", "--lowpass_schedule", "16@0", "32@1")
    assert abs(curriculum[0] - plain[0]) > 1e-3
    pipe = UAEDiTPipeline.from_pretrained(tmp_path / "curriculum" / "pipeline")
    assert pipe.vae.config.dct_lowpass_coefficients == 32  # the pipeline samples the last stage's latent


@pytest.mark.parametrize("extra,message", [
    (["--lowpass_schedule", "16@0", "32@5"], "needs --latent_lowpass N"),
    (["--latent_lowpass", "32", "--lowpass_schedule", "16@3", "32@5"], r"start at step 0.*\[3, 5\]"),
    (["--latent_lowpass", "32", "--lowpass_schedule", "32@0", "16@5"], r"must grow N.*\[32, 16\]"),
    (["--latent_lowpass", "32", "--lowpass_schedule", "16@0", "25@5"], r"ends at N=25: it must end at --latent"),
    (["--latent_lowpass", "32", "--frequency_tokens", "--lowpass_schedule", "16@0", "32@5"], "fixed number of tokens"),
])
def test_lowpass_curriculum_bad_input(data, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        train_dit.parse_args(spatial_args(data, tmp_path / "bad", *extra))
    with pytest.raises(SystemExit):  # argparse: "N@STEP" expected
        train_dit.parse_args(spatial_args(data, tmp_path / "bad", "--latent_lowpass", "32", "--lowpass_schedule", "32"))


@pytest.mark.parametrize("extra,message", [
    (["--frequency_tokens"], "--frequency_tokens .* give --latent_lowpass N"),
    (["--latent_lowpass", "0"], r"--latent_lowpass must lie in \[1, 64\].*got 0"),
    (["--latent_lowpass", "65", "--frequency_tokens"], r"--latent_lowpass must lie in \[1, 64\].*got 65"),
    (["--latent_lowpass", "64", "--coefficients_per_token", "2"], "above 1 only with --frequency_tokens; got 2"),
    (["--latent_lowpass", "64", "--frequency_tokens", "--coefficients_per_token", "0"], "must be >= 1.*got 0"),
])
def test_frequency_limited_latent_bad_input(data, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        train_dit.main(train_dit.parse_args(spatial_args(data, tmp_path / "bad", "--max_train_steps", "1", *extra)))
    assert not (tmp_path / "bad" / "pipeline").exists()
    with pytest.raises(SystemExit):  # argparse: a count or "none" expected
        train_dit.parse_args(tiny_args(data, tmp_path / "bad", "--latent_lowpass", "all"))


def test_shifted_band_clocks(data, tmp_path):
    out = tmp_path / "shifted"
    summary = train_dit.main(train_dit.parse_args(spatial_args(
        data, out, "--max_train_steps", "2", "--band_clock", "shifted", "--band_stagger", "0.3",
        "--band0_loss_weight", "2")))
    assert summary["global_step"] == 2
    pipe = UAEDiTPipeline.from_pretrained(out / "pipeline")
    assert pipe.scheduler.config.band_clock == "shifted" and pipe.scheduler.band_schedule.horizon == pytest.approx(1.3)
    assert pipe.transformer.config.num_time_embeddings == pipe.vae.config.num_bands == 4
    images = pipe(class_labels=[0], num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="--band0_loss_weight must be positive, got 0.0"):
        train_dit.parse_args(spatial_args(data, out, "--band0_loss_weight", "0"))


def test_sample_prediction_trains_and_samples(data, tmp_path):
    out = tmp_path / "x-prediction"
    summary = train_dit.main(train_dit.parse_args(tiny_args(
        data, out, "--max_train_steps", "6", "--logging_steps", "1", "--prediction_type", "sample")))
    curve = [loss for _, loss in summary["loss"]["curve"]]
    assert curve[-1] < curve[0]  # the velocity loss of an x-predicting model goes down
    pipe = UAEDiTPipeline.from_pretrained(out / "pipeline")
    assert pipe.transformer.config.prediction_type == "sample" and pipe.transformer.config.frequency_tokens == 64
    latents = pipe(class_labels=[0, 3], num_inference_steps=3, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (2, pipe.vae.latent_channels, *pipe.vae.latent_size) and torch.isfinite(latents).all()
    with pytest.raises(ValueError, match="--prediction_type sample needs one clock .* got --band_stagger 0.3"):
        train_dit.parse_args(spatial_args(data, out, "--prediction_type", "sample", "--band_stagger", "0.3"))
    with pytest.raises(SystemExit):  # argparse: velocity or sample
        train_dit.parse_args(tiny_args(data, out, "--prediction_type", "epsilon"))


def test_coarse_to_fine_trains_and_samples(data, tmp_path):
    out = tmp_path / "coarse-to-fine"
    summary = train_dit.main(train_dit.parse_args(tiny_args(
        data, out, "--max_train_steps", "6", "--logging_steps", "1", "--coarse_tokens", "4", "--coarse_time", "0.6")))
    curve = [loss for _, loss in summary["loss"]["curve"]]
    assert curve[-1] < curve[0]
    pipe = UAEDiTPipeline.from_pretrained(out / "pipeline")
    config = pipe.transformer.config
    assert (config.coarse_tokens, config.coarse_time, config.frequency_tokens) == (4, 0.6, 64)
    seen = []
    pipe.transformer.blocks[0].register_forward_hook(lambda module, args, output: seen.append(output.shape[1]))
    latents = pipe(class_labels=[0, 3], num_inference_steps=5, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (2, pipe.vae.latent_channels, *pipe.vae.latent_size) and torch.isfinite(latents).all()
    assert 4 in seen and 16 in seen  # the early steps on 4 tokens, the late ones on all 16
    with pytest.raises(ValueError, match="--coarse_tokens needs one clock .* got --band_stagger 0.3"):
        train_dit.parse_args(tiny_args(data, out, "--coarse_tokens", "4", "--band_stagger", "0.3"))
    with pytest.raises(ValueError, match="--coarse_tokens 4 runs the DiT on fewer frequency tokens: it needs "
                                         "--frequency_tokens"):
        train_dit.parse_args(spatial_args(data, out, "--coarse_tokens", "4"))


HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__")


def count_host_reads_in_the_loop(monkeypatch, cuda_sync_debug=False):
    """Patch Tensor's host reads to count the calls made inside the training loop's body: from each batch the loop
    receives to the request for the next (fetching a batch is not counted: the sampler's indices live on the host).
    Reads inside LossLogger.step are counted per global step, apart. With cuda_sync_debug, every loop body after
    the first optimiser step also runs under torch.cuda.set_sync_debug_mode("error")."""
    state = {"in_loop": False, "in_log_step": None, "bodies": 0}
    loop_reads, log_reads = [], {}

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if state["in_log_step"] is not None:
                log_reads[state["in_log_step"]] = log_reads.get(state["in_log_step"], 0) + 1
            elif state["in_loop"]:
                loop_reads.append(name)
            return original(self, *args, **kwargs)
        return read

    original_batches, original_step = train_dit.resumed_batches, train_dit.LossLogger.step

    def batches(*args, **kwargs):
        iterator = original_batches(*args, **kwargs)
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                return
            state["in_loop"], state["bodies"] = True, state["bodies"] + 1
            if cuda_sync_debug and state["bodies"] > 2:  # lazy CUDA initialisation happens in the first step
                torch.cuda.set_sync_debug_mode("error")
            try:
                yield item
            finally:
                state["in_loop"] = False
                if cuda_sync_debug:
                    torch.cuda.set_sync_debug_mode("default")

    def log_step(self, global_step, lr):
        state["in_log_step"] = global_step
        try:
            return original_step(self, global_step, lr)
        finally:
            state["in_log_step"] = None

    monkeypatch.setattr(train_dit, "resumed_batches", batches)
    monkeypatch.setattr(train_dit.LossLogger, "step", log_step)
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    return loop_reads, log_reads, state


@pytest.mark.parametrize("extra", [SPATIAL, [*SPATIAL, "--band_stagger", "0.3"], []],
                         ids=["spatial", "band-progressive", "frequency-tokens"])
def test_training_steps_read_nothing_on_the_host_between_logging_points(data, tmp_path, monkeypatch, extra):
    """6 optimiser steps (12 micro-batches: accumulation 2), EMA, gradient clipping, --logging_steps 100: the loop
    reads no tensor value on the host (.item(), .tolist(), bool(), int(), float()) except in the one logging step,
    the last. On a GPU each read would wait for the device."""
    loop_reads, log_reads, state = count_host_reads_in_the_loop(monkeypatch)
    summary = train_dit.main(train_dit.parse_args(tiny_args(
        data, tmp_path / "run", "--max_train_steps", "6", "--gradient_accumulation_steps", "2", "--use_ema",
        "--max_grad_norm", "1.0", "--logging_steps", "100", "--checkpointing_steps", "100", *extra)))
    monkeypatch.undo()
    assert summary["global_step"] == 6 and state["bodies"] == 12
    assert loop_reads == []
    assert list(log_reads) == [6] and log_reads[6] >= 1  # the counter sees real reads: the final log's


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_steps_do_not_sync_cuda(data, tmp_path, monkeypatch):
    loop_reads, log_reads, state = count_host_reads_in_the_loop(monkeypatch, cuda_sync_debug=True)
    summary = train_dit.main(train_dit.parse_args(tiny_args(
        data, tmp_path / "run", "--max_train_steps", "6", "--gradient_accumulation_steps", "2", "--use_ema",
        "--logging_steps", "100", "--checkpointing_steps", "100")))
    monkeypatch.undo()
    assert summary["global_step"] == 6 and loop_reads == [] and list(log_reads) == [6]


def test_speed_flags_reach_the_transformer(data, tmp_path, monkeypatch):
    """--compile (recorded here, not run: tests/test_compile.py compiles for real), --compile_mode,
    --gradient_checkpointing and --attention_backend reach the trained UAEDiT; the EMA copy stays uncompiled."""
    compiled, built = [], []
    original_from_preset = UAEDiT.from_preset.__func__

    def from_preset(cls, *args, **kwargs):
        built.append(original_from_preset(cls, *args, **kwargs))
        return built[-1]

    def record_compile(fn, **kwargs):
        compiled.append((fn.__self__, kwargs))
        return fn

    monkeypatch.setattr(UAEDiT, "from_preset", classmethod(from_preset))
    monkeypatch.setattr(torch, "compile", record_compile)
    summary = train_dit.main(train_dit.parse_args(tiny_args(
        data, tmp_path / "run", "--max_train_steps", "2", "--use_ema", "--compile", "--compile_mode",
        "reduce-overhead", "--gradient_checkpointing", "--attention_backend", "auto")))
    assert summary["global_step"] == 2
    (model,) = built
    assert [(module, kwargs) for module, kwargs in compiled] == [(model, {"fullgraph": True, "mode": "reduce-overhead"})]
    assert model.gradient_checkpointing
    assert {block.attn.backend for block in model.blocks} == {"auto"}
    saved = UAEDiTPipeline.from_pretrained(tmp_path / "run" / "pipeline").transformer
    assert saved.config.attention_backend == "sdpa"  # the backend is a runtime choice, not saved


def test_start_up_errors_come_before_any_data(tmp_path, monkeypatch, capsys):
    """Flags the machine cannot honour fail in parse_args, before the (here missing) data is opened."""
    base = ["--config", "dit_tiny", "--latent_cache", str(tmp_path / "no-cache"), "--output_dir", str(tmp_path)]
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    if torch.accelerator.is_available():
        monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # a CPU run, wherever the test runs
    with pytest.raises(ValueError, match="--mixed_precision fp16 needs a GPU"):
        train_dit.parse_args([*base, "--mixed_precision", "fp16"])
    from uae_gen.models import attention as attention_module
    monkeypatch.setattr(attention_module, "xformers_available", lambda: False)
    with pytest.raises(ImportError, match="optional xformers package"):
        train_dit.parse_args([*base, "--attention_backend", "xformers"])
    monkeypatch.setattr(attention_module, "xformers_available", lambda: True)  # installed, but a CPU run
    with pytest.raises(ValueError, match="CUDA-only kernels but the run is on cpu"):
        train_dit.parse_args([*base, "--attention_backend", "xformers"])
    with pytest.raises(SystemExit):
        train_dit.parse_args([*base, "--compile", "--compile_mode", "turbo"])
    assert "--compile_mode: invalid choice: 'turbo'" in capsys.readouterr().err
    assert train_dit.parse_args([*base, "--mixed_precision", "bf16"]).mixed_precision == "bf16"
    with pytest.raises(FileNotFoundError):  # accepted flags reach the data, which is missing here
        train_dit.main(train_dit.parse_args([*base, "--attention_backend", "auto"]))
