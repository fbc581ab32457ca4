"""uae_gen/scripts/train_tokenizer.py: the three UAE stages chained on the tiny preset, each started from the
previous stage's output: stages 1 and 2 in-process (one run each, every test of the stage reads it; stage 2's run
also captures its teacher), stage 3 under `accelerate launch` in bf16 (a subprocess: accelerate fixes the precision
once per process) and in-process to watch its discriminator; what each stage trains, the frozen teacher, the
discriminator start step, validation PSNR, exact resume in a new process, flag / preset handling. Tiny random-weight
models; no downloads. (`uae-gen demo`, tests/test_demo.py, runs all three stages under `accelerate launch`.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from uae_gen.losses import LPIPS
from uae_gen.models.autoencoder_uae import UAE_PRESETS, AutoencoderUAE
from uae_gen.models.encoders import SemanticEncoder
from uae_gen.scripts import train_tokenizer

from .file_modes import unreadable_entries

REPO = Path(__file__).resolve().parents[1]
# Measured on 16 held-out images: +7.0 / +6.9 / +6.6 dB after 20 steps (batch 8, seeds 0-2); we require +4 dB.
PSNR_GAIN_DB, PSNR_STEPS = 4.0, 20


def run_in_process(argv):
    return train_tokenizer.main(train_tokenizer.parse_args([str(a) for a in argv]))


def tiny_argv(stage, output_dir, steps, *extra):
    return ["--config", "tiny", "--stage", stage, "--output_dir", output_dir, "--max_train_steps", steps, *extra]


def read_json(path):
    with open(path) as file:
        return json.load(file)


def checkpoint_autoencoder(checkpoint_dir, name="autoencoder"):
    return load_file(os.path.join(checkpoint_dir, name, "diffusion_pytorch_model.safetensors"))


def encoder_tensors(state):
    prefix = "encoder.backbone."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("train_tokenizer")


@pytest.fixture(scope="module")
def encoder_file(workdir):
    """The '--pretrained_encoder': a random SemanticEncoder of the tiny preset, saved as safetensors."""
    tiny = UAE_PRESETS["tiny"]
    torch.manual_seed(0)
    encoder = SemanticEncoder(input_size=tiny["encoder_input_size"], model_kwargs=tiny["encoder_kwargs"])
    path = str(workdir / "tiny_encoder.safetensors")
    save_file({k: v.contiguous() for k, v in encoder.backbone.state_dict().items()}, path)
    return path


def accelerate_launch_command(script_argv, mixed_precision="no"):
    return ["accelerate", "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision",
            mixed_precision, "--dynamo_backend", "no", "-m", "uae_gen.scripts.train_tokenizer", *map(str, script_argv)]


def run_side_by_side(runs: dict, log_dir: Path) -> None:
    """Run independent commands ({name: (command, environment)}) at the same time and wait for all of them: a fresh
    interpreter spends most of its ~10 s start-up importing on one core, so two of them take about as long as one on
    a 2-core machine. Their output goes to files (a full pipe would stall a process that nobody reads yet)."""
    running = {}
    for name, (command, env) in runs.items():
        log = open(log_dir / f"{name.replace(' ', '_')}.log", "w+")
        running[name] = (subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    for name, (process, log) in running.items():
        with log:
            returncode = process.wait()
            log.seek(0)
            assert returncode == 0, (name, log.read()[-3000:])


@pytest.fixture(scope="module")
def stage1(workdir, encoder_file):
    """Stage 1 in-process (the launcher's start-up would double its cost; stage 3 below runs under it)."""
    output_dir = workdir / "stage1"
    run_in_process(tiny_argv(1, output_dir, PSNR_STEPS, "--pretrained_encoder", encoder_file, "--train_batch_size", 8,
                             "--validation_steps", PSNR_STEPS, "--checkpointing_steps", PSNR_STEPS,
                             "--num_validation_images", 16))
    return output_dir


@pytest.fixture(scope="module")
def stage2(workdir, stage1, encoder_file, random_vgg_file):
    """One stage-2 run from stage 1's output (LPIPS, gradient accumulation), in-process so that the teacher object
    itself can be inspected after the encoder has taken optimiser steps: returns the output folder, the summary and
    the teacher(s) the script built."""
    teachers, make_teacher = [], train_tokenizer.make_teacher

    def capture_teacher(encoder):
        teachers.append(make_teacher(encoder))
        return teachers[-1]

    output_dir = workdir / "stage2"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_tokenizer, "make_teacher", capture_teacher)
        run_in_process(tiny_argv(
            2, output_dir, 2, "--init_from", stage1, "--pretrained_encoder", encoder_file, "--train_batch_size", 4,
            "--gradient_accumulation_steps", 2, "--lpips_weight", 0.5, "--lpips_vgg_weights", random_vgg_file,
            "--validation_steps", 100, "--checkpointing_steps", 2, "--num_validation_images", 16))
    return output_dir, read_json(output_dir / "training_summary.json"), teachers


@pytest.fixture(scope="module")
def random_vgg_file(workdir):
    path = str(workdir / "vgg16_random.safetensors")
    torch.manual_seed(0)
    features = LPIPS(random_weights=True).features.state_dict()
    save_file({f"features.{k}": v.contiguous() for k, v in features.items()}, path)
    return path


def test_stage1_freezes_the_encoder_and_improves_psnr(stage1, encoder_file):
    initial = load_file(encoder_file)
    final = AutoencoderUAE.from_pretrained(stage1)  # the EMA weights
    live = encoder_tensors(checkpoint_autoencoder(stage1 / f"checkpoint-{PSNR_STEPS}"))
    for state in (encoder_tensors(final.state_dict()), live):
        assert state.keys() == initial.keys()
        assert all(torch.equal(state[k], initial[k]) for k in initial)  # bit-identical: never trained

    assert unreadable_entries(stage1) == []  # weights, checkpoints, validation grids: readable by other users
    summary = read_json(stage1 / "training_summary.json")
    assert summary["global_step"] == PSNR_STEPS and summary["trained"] == ["decoder", "modulator"]
    assert summary["losses"] == ["l1"] and summary["band_noise"] is False
    validation = read_json(stage1 / "validation.json")
    assert [entry["step"] for entry in validation] == [0, PSNR_STEPS]
    assert validation[1]["psnr"] >= validation[0]["psnr"] + PSNR_GAIN_DB, validation
    assert (stage1 / "validation" / f"step-{PSNR_STEPS:07d}.png").is_file()

    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert final(images).sample.shape == (2, 3, 32, 32)


def test_stage2_starts_from_stage1_and_trains_the_encoder(stage1, stage2, encoder_file):
    output_dir, summary, _ = stage2
    initial = load_file(encoder_file)
    # Stage 2's first evaluation is stage 1's output (its EMA weights) on the same held-out images.
    assert summary["validation"][0]["psnr"] == pytest.approx(read_json(stage1 / "validation.json")[-1]["psnr_ema"],
                                                             abs=1e-4)
    live = encoder_tensors(checkpoint_autoencoder(output_dir / "checkpoint-2"))
    final = encoder_tensors(AutoencoderUAE.from_pretrained(output_dir).state_dict())
    for state in (live, final):
        assert any(not torch.equal(state[k], initial[k]) for k in initial)  # the encoder trained
    assert summary["trained"] == ["decoder", "modulator", "encoder"]
    assert summary["losses"] == ["l1", "lpips", "semantic"]


def test_stage2_teacher_is_the_initial_encoder_frozen_and_unchanged(stage2, encoder_file):
    """The teacher object stage 2 built (captured by the stage2 fixture), after the encoder took optimiser steps."""
    output_dir, _, teachers = stage2
    initial = load_file(encoder_file)
    trained = encoder_tensors(AutoencoderUAE.from_pretrained(output_dir).state_dict())
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)
    (teacher,) = teachers
    teacher_state = teacher.backbone.state_dict()
    assert all(torch.equal(teacher_state[k], initial[k]) for k in initial)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_stage3_noise_gan_and_no_discriminator_update_before_its_start(workdir, stage2):
    initial_discriminators = []
    original = train_tokenizer.DinoDiscriminator

    def capture_discriminator(**kwargs):
        discriminator = original(**kwargs)
        initial_discriminators.append({k: v.clone() for k, v in discriminator.state_dict().items()})
        return discriminator

    output_dir = workdir / "stage3"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_tokenizer, "DinoDiscriminator", capture_discriminator)
        summary = run_in_process(tiny_argv(
            3, output_dir, 3, "--init_from", stage2[0], "--train_batch_size", 4, "--discriminator_start_step", 2,
            "--gan_start_step", 1, "--checkpointing_steps", 1, "--checkpoints_total_limit", 3,
            "--validation_steps", 3, "--num_validation_images", 4))
    (initial,) = initial_discriminators
    states = {step: load_file(output_dir / f"checkpoint-{step}" / "model.safetensors") for step in (1, 2, 3)}
    d_optimizer = {step: torch.load(output_dir / f"checkpoint-{step}" / "optimizer_1.bin", weights_only=True)
                   for step in (1, 2, 3)}
    for step in (1, 2):  # optimisation steps 0 and 1 come before --discriminator_start_step 2
        assert states[step].keys() == initial.keys()
        assert all(torch.equal(states[step][k], initial[k]) for k in initial)
        assert d_optimizer[step]["state"] == {}
    assert any(not torch.equal(states[3][k], initial[k]) for k in initial if k.startswith("heads."))
    assert all(torch.equal(states[3][k], initial[k]) for k in initial if k.startswith("backbone."))  # frozen
    assert {int(s["step"]) for s in d_optimizer[3]["state"].values()} == {1}

    assert summary["band_noise"] is True
    assert summary["losses"] == ["discriminator", "generator", "l1", "semantic"]
    assert AutoencoderUAE.from_pretrained(output_dir).config.image_size == 32


def resume_argv(encoder_file, output_dir, steps):
    return tiny_argv(3, output_dir, steps, "--pretrained_encoder", encoder_file, "--max_train_samples", 10,
                     "--train_batch_size", 4, "--checkpointing_steps", 3, "--validation_steps", 100,
                     "--num_validation_images", 4, "--discriminator_start_step", 1, "--gan_start_step", 1,
                     "--ema_decay", 0.9)


def bf16_argv(stage2, encoder_file, random_vgg_file, output_dir):
    return tiny_argv(3, output_dir, 2, "--init_from", stage2[0], "--pretrained_encoder", encoder_file,
                     "--mixed_precision", "bf16",
                     "--train_batch_size", 4, "--lpips_weight", 1, "--lpips_vgg_weights", random_vgg_file,
                     "--discriminator_start_step", 0, "--gan_start_step", 0, "--num_validation_images", 4)


@pytest.fixture(scope="module")
def new_processes(workdir, stage2, encoder_file, random_vgg_file):
    """This file's two runs in fresh processes, started together (run_side_by_side): the resume of a 3-step run to
    6 steps (`python -m`, next to an uninterrupted 6-step run made in-process), and stage 3 in bf16 under
    `accelerate launch`, chained from stage 2's output."""
    uninterrupted, resumed, bf16 = workdir / "uninterrupted", workdir / "resumed", workdir / "bf16"
    run_in_process(resume_argv(encoder_file, uninterrupted, 6))
    run_in_process(resume_argv(encoder_file, resumed, 3))
    run_side_by_side({
        "resume": ([sys.executable, "-m", "uae_gen.scripts.train_tokenizer",
                    *map(str, resume_argv(encoder_file, resumed, 6)), "--resume_from_checkpoint", "latest"],
                   {**os.environ, "HF_HUB_OFFLINE": "1"}),
        "bf16 launch": (accelerate_launch_command(bf16_argv(stage2, encoder_file, random_vgg_file, bf16),
                                                  mixed_precision="bf16"),
                        {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}),
    }, workdir)
    return {"uninterrupted": uninterrupted, "resumed": resumed, "bf16": bf16}


def test_resume_in_a_new_process_is_exact(new_processes):
    """N = 3 steps + checkpoint, then a new process resumes to 2N; compared with an uninterrupted 2N-step run
    (in-process). 10 images in batches of 4 make 2 steps per epoch, so the resume lands mid-epoch 1 and crosses
    into epoch 2; D updates and the G adversarial term are on from step 1, EMA decay 0.9."""
    uninterrupted, resumed = new_processes["uninterrupted"], new_processes["resumed"]
    assert read_json(resumed / "training_summary.json")["resumed_from"].endswith("checkpoint-3")

    a, b = uninterrupted / "checkpoint-6", resumed / "checkpoint-6"
    for name in ("autoencoder", "autoencoder_ema"):
        first, second = checkpoint_autoencoder(a, name), checkpoint_autoencoder(b, name)
        assert all(torch.equal(first[k], second[k]) for k in first)
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")  # discriminator
    assert all(torch.equal(first[k], second[k]) for k in first)
    for name in ("optimizer.bin", "optimizer_1.bin"):  # autoencoder and discriminator AdamW states
        first, second = torch.load(a / name, weights_only=True), torch.load(b / name, weights_only=True)
        assert first["state"].keys() == second["state"].keys() and first["state"]
        for index, state in first["state"].items():
            assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(second["state"][index][k]))
                       for k, v in state.items())
    ema_run = load_file(uninterrupted / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(ema_run[k], v) for k, v in checkpoint_autoencoder(a, "autoencoder_ema").items())


def test_stage3_under_accelerate_launch_from_stage2_with_every_loss_in_bf16(new_processes):
    """Stage 3 under `accelerate launch`, chained from stage 2's output (the new_processes fixture runs it). The
    ImageNet preset trains in bf16: model outputs, LPIPS, the teacher and the discriminator must cope (a subprocess:
    accelerate fixes the precision once per process)."""
    output_dir = new_processes["bf16"]
    summary = read_json(output_dir / "training_summary.json")
    assert summary["losses"] == ["discriminator", "generator", "l1", "lpips", "semantic"]
    assert all(torch.isfinite(torch.tensor(value)) for value in summary["last_logs"].values())
    assert AutoencoderUAE.from_pretrained(output_dir).dtype == torch.float32


def test_presets_and_overrides():
    parse = train_tokenizer.parse_args
    tiny3 = parse(["--config", "tiny", "--stage", "3", "--learning_rate", "0.123"])
    assert tiny3.learning_rate == 0.123  # the command line wins over the preset
    assert tiny3.discriminator_start_step == 20 and tiny3.band_noise is True  # stage-specific key, stage 3 default
    assert parse(["--config", "tiny", "--stage", "1"]).band_noise is False
    assert parse(["--config", "tiny", "--stage", "3", "--no-band_noise"]).band_noise is False

    # method.md 2.1 (v1): 64 then 32 per GPU, 2e-4 then 5e-5 -> 1e-5 cosine, EMA 0.9999 / 0.999, GAN 0.75 adaptive.
    common = ["--config", "tokenizer_imagenet256", "--train_data_dir", "x",
              "--lpips_vgg_weights", "vgg.safetensors", "--stage"]
    s1, s2, s3 = (parse(common + [str(stage)]) for stage in (1, 2, 3))
    assert (s1.train_batch_size, s1.learning_rate, s1.ema_decay, s1.lpips_weight) == (64, 2e-4, 0.9999, 0.0)
    assert (s2.train_batch_size, s2.semantic_weight, s2.lpips_weight, s2.encoder_lr_ratio) == (32, 0.1, 1.0, 1.0)
    assert (s3.learning_rate, s3.adam_beta1, s3.adam_beta2, s3.ema_decay) == (5e-5, 0.5, 0.9, 0.999)
    assert s3.lr_end == pytest.approx(1e-5)
    assert (s3.gan_weight, s3.discriminator_learning_rate, s3.diffaugment_cutout) == (0.75, 1e-4, 0.2)
    assert s3.band_noise is True and s3.lr_scheduler == "cosine"
    assert s1.pretrained_encoder == s3.pretrained_encoder == "timm/vit_base_patch14_reg4_dinov2.lvd142m"


def test_bad_flags_raise_clear_errors(tmp_path):
    parse = train_tokenizer.parse_args
    base = ["--dataset", "demo-digits", "--random_encoder"]
    with pytest.raises(ValueError, match="lpips_vgg_weights"):
        parse(["--stage", "2", *base, "--lpips_weight", "1"])
    with pytest.raises(ValueError, match="discriminator_weights"):
        parse(["--stage", "3", *base])
    with pytest.raises(ValueError, match="initial weights"):
        parse(["--stage", "1", "--dataset", "demo-digits"])
    with pytest.raises(ValueError, match="exactly one of"):
        parse(["--stage", "1", "--random_encoder"])
    with pytest.raises(FileNotFoundError, match="init_from"):
        parse(["--stage", "2", *base, "--init_from", str(tmp_path / "missing")])
    with pytest.raises(FileNotFoundError, match="not found"):
        parse(["--stage", "1", *base, "--config", "no-such-preset"])
    preset = tmp_path / "bad.json"
    preset.write_text(json.dumps({"learning_rat": 1.0}))
    with pytest.raises(ValueError, match="learning_rat"):
        parse(["--stage", "1", *base, "--config", str(preset)])
    preset.write_text(json.dumps({"stages": {"1": {"lr_scheduler": "cosin"}}}))
    with pytest.raises(ValueError, match="cosin"):
        parse(["--stage", "1", *base, "--config", str(preset)])
    preset.write_text(json.dumps({"stages": {"1": {"stage": 2}}}))
    with pytest.raises(ValueError, match="forbidden keys \\['stage'\\]"):
        parse(["--stage", "1", *base, "--config", str(preset)])
    with pytest.raises(ValueError, match="logging_steps"):
        parse(["--stage", "1", *base, "--logging_steps", "0"])
    with pytest.raises(ValueError, match="lr_end"):
        parse(["--stage", "1", *base, "--lr_end", "1.0"])


def test_deprecated_lr_final_ratio_becomes_lr_end():
    """--lr_final_ratio (the old spelling, a fraction of the peak LR) still works, as a flag or a preset key."""
    base = ["--stage", "1", "--dataset", "demo-digits", "--random_encoder", "--learning_rate", "1e-3"]
    with pytest.warns(FutureWarning, match="--lr_end"):
        args = train_tokenizer.parse_args([*base, "--lr_final_ratio", "0.1"])
    assert args.lr_end == pytest.approx(1e-4) and args.lr_final_ratio is None
    assert train_tokenizer.parse_args([*base, "--lr_end", "1e-4"]).lr_end == 1e-4


def test_gradient_checkpointing_of_decoder_and_encoder_gives_same_gradients():
    """What --gradient_checkpointing switches on (train_tokenizer.enable_gradient_checkpointing): the decoder's and,
    when it trains, the encoder's blocks re-run in the backward pass, and every gradient stays the same."""
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def gradients(checkpointing: bool):
        torch.manual_seed(0)
        model = AutoencoderUAE.from_preset("tiny").train()
        with torch.no_grad():  # random weights everywhere (the spectral transform starts at zero)
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
        if checkpointing:
            train_tokenizer.enable_gradient_checkpointing(model, train_encoder=True)
        calls = {"decoder": 0, "encoder": 0}
        model.decoder.blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__("decoder", calls["decoder"] + 1))
        model.encoder.backbone.blocks[0].register_forward_pre_hook(
            lambda *_: calls.__setitem__("encoder", calls["encoder"] + 1))
        reconstruction = model(images, inject_noise=False, return_dict=False)[0]
        (reconstruction - images).abs().mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}, calls

    plain, plain_calls = gradients(False)
    checkpointed, checkpointed_calls = gradients(True)
    assert plain_calls == {"decoder": 1, "encoder": 1}
    assert checkpointed_calls == {"decoder": 2, "encoder": 2}  # each block ran again in the backward pass
    assert plain.keys() == checkpointed.keys() and any(k.startswith("encoder.") for k in plain)
    for name, grad in plain.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_speed_flags_reach_the_models(workdir, encoder_file, monkeypatch):
    """--compile compiles the encoder, decoder and teacher in place (fullgraph, the chosen mode; torch.compile is
    recorded, not run: tests/test_compile.py compiles for real) and --gradient_checkpointing reaches both ViTs."""
    compiled = []

    def record_compile(fn, **kwargs):
        compiled.append((fn.__self__, kwargs))
        return fn

    built = []
    original_build = train_tokenizer.build_autoencoder
    monkeypatch.setattr(train_tokenizer, "build_autoencoder", lambda args: built.append(original_build(args)) or built[-1])
    monkeypatch.setattr(torch, "compile", record_compile)
    summary = run_in_process(tiny_argv(2, workdir / "speed", 1, "--pretrained_encoder", encoder_file,
                                       "--train_batch_size", 4, "--validation_steps", 100, "--compile",
                                       "--compile_mode", "max-autotune-no-cudagraphs", "--gradient_checkpointing"))
    assert summary["global_step"] == 1
    model = built[0]
    kinds = sorted(type(module).__name__ for module, _ in compiled)
    assert kinds == ["SemanticEncoder", "SemanticEncoder", "ViTDecoder"]  # encoder, teacher, decoder
    assert any(module is model.encoder for module, _ in compiled) and any(m is model.decoder for m, _ in compiled)
    assert all(kwargs == {"fullgraph": True, "mode": "max-autotune-no-cudagraphs"} for _, kwargs in compiled)
    assert model.decoder.gradient_checkpointing and model.encoder.backbone.grad_checkpointing


def test_precision_and_compile_flags_fail_at_start_up(tmp_path, monkeypatch, capsys):
    parse = train_tokenizer.parse_args
    base = ["--stage", "1", "--random_encoder", "--train_data_dir", str(tmp_path / "no-images")]
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    if torch.accelerator.is_available():
        monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # a CPU run, wherever the test runs
    with pytest.raises(ValueError, match="--mixed_precision fp16 needs a GPU"):
        parse([*base, "--mixed_precision", "fp16"])
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # what `accelerate launch --mixed_precision fp16` sets
    with pytest.raises(ValueError, match="--mixed_precision fp16 needs a GPU"):
        parse(base)
    assert parse([*base, "--mixed_precision", "bf16"]).mixed_precision == "bf16"  # the flag wins over the env
    with pytest.raises(SystemExit):
        parse([*base, "--compile", "--compile_mode", "fastest"])
    assert "--compile_mode: invalid choice: 'fastest'" in capsys.readouterr().err


def test_stage3_steps_read_only_the_cpu_augmentation_draws_on_the_host(tmp_path, monkeypatch):
    """Inside the loop body (batch fetching, LossLogger.step and validation not counted), 3 stage-3 steps with the GAN
    on read no tensor value on the host except DiffAugment's amounts, which it draws from a CPU generator on purpose
    (CPU tensors: no device sync on a GPU), three per step (generator loss, real and fake of the D step)."""
    import traceback

    state, reads = {"on": False}, []

    def paused(function):
        def run(*args, **kwargs):
            on, state["on"] = state["on"], False
            try:
                return function(*args, **kwargs)
            finally:
                state["on"] = on
        return run

    original_batches = train_tokenizer.resumed_batches

    def batches(*args, **kwargs):
        iterator = original_batches(*args, **kwargs)
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                return
            state["on"] = True
            try:
                yield item
            finally:
                state["on"] = False

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if state["on"]:
                caller = traceback.extract_stack(limit=2)[0]
                reads.append((name, os.path.basename(caller.filename), caller.name))
            return original(self, *args, **kwargs)
        return read

    monkeypatch.setattr(train_tokenizer, "resumed_batches", batches)
    monkeypatch.setattr(train_tokenizer.LossLogger, "step", paused(train_tokenizer.LossLogger.step))
    monkeypatch.setattr(train_tokenizer, "validate", paused(train_tokenizer.validate))
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    summary = run_in_process(tiny_argv(3, tmp_path / "stage3", 3, "--random_encoder", "--train_batch_size", 2,
                                       "--discriminator_start_step", 0, "--gan_start_step", 0, "--logging_steps", 100,
                                       "--validation_steps", 100))
    monkeypatch.undo()
    assert summary["global_step"] == 3 and "generator" in summary["losses"] and "discriminator" in summary["losses"]
    assert reads == [("tolist", "diffaugment.py", "sample")] * 9
