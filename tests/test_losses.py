"""Tests for uae_gen.losses: pixel, GAN losses + adaptive weight + schedule, semantic band loss, LPIPS,
DINO discriminator and DiffAugment. Tiny random-weight models only; nothing downloads."""

import math

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file

from uae_gen.losses import (
    LPIPS,
    AugmentationDraw,
    DiffAugment,
    DinoDiscriminator,
    GANLossSchedule,
    adaptive_generator_weight,
    hinge_discriminator_loss,
    hinge_generator_loss,
    l1_reconstruction_loss,
    l2_reconstruction_loss,
    lpips_package_linear_weights_path,
    non_saturating_generator_loss,
    quantize_to_uint8_grid,
    semantic_band_loss,
    vanilla_discriminator_loss,
)
from uae_gen.losses.discriminator import LocalBatchNorm

TINY_VIT = dict(img_size=32, depth=4, embed_dim=64, num_heads=2)
TINY_TAPS = (0, 1, 2, 3)


def images(batch=2, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


# ----------------------------------------------------------------------------- pixel


def test_pixel_losses_match_hand_computation():
    reconstruction = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    target = torch.tensor([[0.0, 0.0], [0.5, 1.0]])
    assert l1_reconstruction_loss(reconstruction, target).item() == pytest.approx((1 + 2 + 0 + 2) / 4)
    assert l2_reconstruction_loss(reconstruction, target).item() == pytest.approx((1 + 4 + 0 + 4) / 4)
    with pytest.raises(ValueError, match="same shape"):
        l1_reconstruction_loss(reconstruction, target[:1])


# ----------------------------------------------------------------------------- GAN losses

LOGITS_REAL = torch.tensor([[2.0, 0.5, -1.0]])
LOGITS_FAKE = torch.tensor([[-3.0, 0.0, 0.5]])


def test_discriminator_losses_match_hand_computation():
    # relu(1 - real) = [0, 0.5, 2]; relu(1 + fake) = [0, 1, 1.5]
    expected_hinge = 0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 1.5) / 3)
    assert hinge_discriminator_loss(LOGITS_REAL, LOGITS_FAKE).item() == pytest.approx(expected_hinge)

    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected_vanilla = 0.5 * (
        sum(softplus(-r) for r in (2.0, 0.5, -1.0)) / 3 + sum(softplus(f) for f in (-3.0, 0.0, 0.5)) / 3
    )
    assert vanilla_discriminator_loss(LOGITS_REAL, LOGITS_FAKE).item() == pytest.approx(expected_vanilla)


def test_generator_losses_match_hand_computation():
    assert hinge_generator_loss(LOGITS_FAKE).item() == pytest.approx(-(-3.0 + 0.0 + 0.5) / 3)
    expected = sum(-math.log(1 / (1 + math.exp(-f))) for f in (-3.0, 0.0, 0.5)) / 3
    assert non_saturating_generator_loss(LOGITS_FAKE).item() == pytest.approx(expected)


def toy_decoder_losses(generator_scale=1.0):
    torch.manual_seed(0)
    last_layer = nn.Linear(4, 3)
    features = torch.randn(5, 4)
    output = last_layer(features)
    reconstruction_loss = (output - 1.0).abs().mean()
    generator_loss = -generator_scale * (torch.tanh(output) * torch.arange(3.0)).mean()
    return last_layer, output, reconstruction_loss, generator_loss


def test_adaptive_weight_equals_its_formula_and_keeps_the_graph():
    last_layer, _, reconstruction_loss, generator_loss = toy_decoder_losses()
    weight = adaptive_generator_weight(reconstruction_loss, generator_loss, last_layer.weight)

    reconstruction_grad = torch.autograd.grad(reconstruction_loss, last_layer.weight, retain_graph=True)[0]
    generator_grad = torch.autograd.grad(generator_loss, last_layer.weight, retain_graph=True)[0]
    expected = reconstruction_grad.norm() / (generator_grad.norm() + 1e-6)
    assert 0 < expected.item() < 1e4
    assert weight.item() == pytest.approx(expected.item(), rel=1e-6)
    assert not weight.requires_grad
    # The graphs survive, so the caller can still backpropagate the weighted total.
    (reconstruction_loss + weight * generator_loss).backward()
    assert last_layer.weight.grad is not None


def test_adaptive_weight_is_clamped_and_rejects_unused_layer():
    last_layer, _, reconstruction_loss, generator_loss = toy_decoder_losses(generator_scale=1e-12)
    assert adaptive_generator_weight(reconstruction_loss, generator_loss, last_layer.weight).item() == 1e4
    assert adaptive_generator_weight(reconstruction_loss, generator_loss, last_layer.weight, max_weight=5.0).item() == 5.0
    unused = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="does not take part"):
        adaptive_generator_weight(reconstruction_loss, generator_loss, unused)


def test_gan_schedule_gates_discriminator_updates_and_generator_weight():
    schedule = GANLossSchedule(discriminator_start_step=3, generator_start_step=5, generator_weight=0.75)
    torch.manual_seed(0)
    discriminator = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(discriminator.parameters(), lr=0.1)
    real, fake = torch.randn(4, 3), torch.randn(4, 3) + 1.0
    for step in range(6):
        before = discriminator.weight.detach().clone()
        if schedule.update_discriminator(step):
            optimizer.zero_grad()
            hinge_discriminator_loss(discriminator(real), discriminator(fake)).backward()
            optimizer.step()
        changed = not torch.equal(before, discriminator.weight)
        assert changed == (step >= 3), step

        last_layer, output, reconstruction_loss, _ = toy_decoder_losses()
        generator_loss = hinge_generator_loss(discriminator(output))
        total = reconstruction_loss + schedule.generator_adversarial_weight(step) * generator_loss
        total_grad = torch.autograd.grad(total, last_layer.weight, retain_graph=True)[0]
        reconstruction_grad = torch.autograd.grad(reconstruction_loss, last_layer.weight)[0]
        assert torch.equal(total_grad, reconstruction_grad) == (step < 5), step
    assert [schedule.generator_adversarial_weight(s) for s in (4, 5, 9)] == [0.0, 0.75, 0.75]
    with pytest.raises(ValueError):
        GANLossSchedule(discriminator_start_step=-1)


def test_quantize_to_uint8_grid():
    values = torch.tensor([-1.5, -1.0, -0.3, 0.0, 0.1234, 1.0, 2.0])
    quantized = quantize_to_uint8_grid(values)
    levels = (quantized + 1.0) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert quantized.min().item() == -1.0 and quantized.max().item() == 1.0
    assert (quantized - values.clamp(-1, 1)).abs().max().item() <= 1 / 255 + 1e-6


# ----------------------------------------------------------------------------- semantic band loss


def test_semantic_band_loss_value_and_gradient_paths():
    torch.manual_seed(0)
    student = torch.randn(2, 3, 4, 2, 2, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 2, 2, requires_grad=True)
    loss = semantic_band_loss(student, teacher, num_base_bands=2)
    per_band = [((student[:, k] - teacher[:, k]) ** 2).mean() for k in range(2)]
    assert loss.item() == pytest.approx(((per_band[0] + per_band[1]) / 2).item(), rel=1e-6)

    loss.backward()
    assert teacher.grad is None
    assert torch.count_nonzero(student.grad[:, 2:]) == 0
    assert torch.count_nonzero(student.grad[:, :2]) == student.grad[:, :2].numel()

    perturbed = student.detach().clone()
    perturbed[:, 2:] += 10.0
    assert torch.equal(semantic_band_loss(perturbed, teacher, 2), loss.detach())
    perturbed[:, 1] += 1.0
    assert semantic_band_loss(perturbed, teacher, 2).item() > loss.item()


def test_semantic_band_loss_rejects_bad_input():
    bands = torch.zeros(2, 3, 4, 2, 2)
    with pytest.raises(ValueError, match="num_base_bands"):
        semantic_band_loss(bands, bands, num_base_bands=4)
    with pytest.raises(ValueError, match="num_base_bands"):
        semantic_band_loss(bands, bands, num_base_bands=0)
    with pytest.raises(ValueError, match=r"\(B, K, C, h, w\)"):
        semantic_band_loss(bands[:, 0], bands[:, 0])
    with pytest.raises(ValueError, match="differ"):
        semantic_band_loss(bands, torch.zeros(2, 3, 5, 2, 2))


# ----------------------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def random_lpips():
    torch.manual_seed(0)
    return LPIPS(random_weights=True)


def save_lpips_weights(model, directory):
    vgg_path = str(directory / "vgg16.safetensors")
    save_file({f"features.{k}": v.contiguous() for k, v in model.features.state_dict().items()}, vgg_path)
    linear_path = str(directory / "lpips_linear.pth")
    torch.save({f"lin{k}.model.1.weight": layer.weight.detach() for k, layer in enumerate(model.linear_layers)}, linear_path)
    return vgg_path, linear_path


def test_lpips_zero_on_identical_positive_and_symmetric(random_lpips):
    first, second = images(seed=1), images(seed=2)
    assert random_lpips(first, first).item() == pytest.approx(0.0, abs=1e-7)
    forward, backward = random_lpips(first, second), random_lpips(second, first)
    assert forward.item() > 0
    assert forward.item() == pytest.approx(backward.item(), rel=1e-5)
    per_image = random_lpips(first, second, reduction="none")
    assert per_image.shape == (2,) and torch.all(per_image > 0)
    assert per_image.mean().item() == pytest.approx(forward.item(), rel=1e-6)


def test_lpips_gradient_reaches_images_not_weights(random_lpips):
    first = images(seed=1).requires_grad_(True)
    random_lpips(first, images(seed=2)).backward()
    assert first.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in random_lpips.parameters())


def test_lpips_without_weights_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="vgg_weights_path"):
        LPIPS()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LPIPS(vgg_weights_path=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="random_weights"):
        LPIPS(vgg_weights_path="x", random_weights=True)
    save_file({"features.0.weight": torch.zeros(64, 3, 3, 3)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="lacks"):
        LPIPS(vgg_weights_path=str(tmp_path / "partial.safetensors"))


def test_lpips_weights_round_trip_through_files(random_lpips, tmp_path):
    vgg_path, linear_path = save_lpips_weights(random_lpips, tmp_path)
    reloaded = LPIPS(vgg_weights_path=vgg_path, linear_weights_path=linear_path)
    first, second = images(seed=3), images(seed=4)
    expected = random_lpips(first, second, reduction="none")
    assert torch.allclose(reloaded(first, second, reduction="none"), expected, rtol=1e-5, atol=1e-7)


def test_lpips_default_linear_weights_come_from_the_lpips_package(random_lpips, tmp_path):
    vgg_path, _ = save_lpips_weights(random_lpips, tmp_path)
    model = LPIPS(vgg_weights_path=vgg_path)
    shipped = torch.load(lpips_package_linear_weights_path(), map_location="cpu", weights_only=True)
    for k, layer in enumerate(model.linear_layers):
        assert torch.equal(layer.weight, shipped[f"lin{k}.model.1.weight"])
        assert layer.weight.min() >= 0


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lpips_matches_the_reference_lpips_package(tmp_path):
    """Same VGG weights (random, torchvision layout) + the package's linear layers -> same distances."""
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(0)
    reference = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    # The reference's slices keep torchvision's `features` indices: sliceN.<index>.<weight|bias>.
    vgg = {f"features.{name.split('.', 1)[1]}": p.detach().contiguous() for name, p in reference.net.named_parameters()}
    save_file(vgg, str(tmp_path / "vgg16.safetensors"))
    ours = LPIPS(vgg_weights_path=str(tmp_path / "vgg16.safetensors"))
    first, second = images(batch=3, size=64, seed=6), images(batch=3, size=64, seed=7)
    with torch.no_grad():
        expected = reference(first, second).flatten()
    assert torch.allclose(ours(first, second, reduction="none"), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- discriminator


@pytest.fixture(scope="module")
def tiny_discriminator():
    torch.manual_seed(0)
    return DinoDiscriminator(backbone_kwargs=TINY_VIT, tap_blocks=TINY_TAPS)


def test_discriminator_output_shape_and_resize(tiny_discriminator):
    # 32 px / patch 8 -> 16 tokens; one logit map per tap plus the final output.
    assert tiny_discriminator(images(batch=3)).shape == (3, len(TINY_TAPS) + 1, 16)
    assert tiny_discriminator(images(batch=2, size=48)).shape == (2, len(TINY_TAPS) + 1, 16)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny_discriminator(torch.zeros(2, 1, 32, 32))


def test_discriminator_backbone_frozen_heads_trainable(tiny_discriminator):
    tiny_discriminator.zero_grad(set_to_none=True)
    tiny_discriminator.train()
    assert not tiny_discriminator.backbone.training and tiny_discriminator.heads.training
    fake = images(seed=5).requires_grad_(True)
    hinge_generator_loss(tiny_discriminator(fake)).backward()
    assert all(not p.requires_grad and p.grad is None for p in tiny_discriminator.backbone.parameters())
    head_parameters = list(tiny_discriminator.heads.parameters())
    assert head_parameters and all(p.requires_grad for p in head_parameters)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head_parameters)
    # The adversarial gradient reaches the generated images through the frozen backbone.
    assert fake.grad.abs().sum() > 0
    tiny_discriminator.zero_grad(set_to_none=True)


def test_discriminator_heads_are_spectrally_normalised(tiny_discriminator):
    logit_conv = tiny_discriminator.heads[0].to_logit
    assert torch.nn.utils.parametrize.is_parametrized(logit_conv, "weight")
    # A one-row weight: a single power iteration gives its exact spectral norm, which is normalised to 1.
    tiny_discriminator.train()
    tiny_discriminator(images())
    assert torch.linalg.matrix_norm(logit_conv.weight.detach().flatten(1), ord=2).item() == pytest.approx(1.0, rel=1e-4)


def test_local_batch_norm_normalises_each_sample_alone():
    torch.manual_seed(0)
    norm = LocalBatchNorm(4)
    x = torch.randn(3, 4, 10) * 5 + 2
    out = norm(x)
    assert torch.allclose(out.mean(dim=2), torch.zeros(3, 4), atol=1e-5)
    assert torch.allclose(out.var(dim=2, unbiased=False), torch.ones(3, 4), atol=1e-3)
    other_batch = torch.cat([x[:1], torch.randn(2, 4, 10)])
    assert torch.allclose(norm(other_batch)[0], out[0])


def write_backbone_file(path, seed):
    """A tiny DINO-architecture state dict with non-zero qkv biases, saved under DDP-style 'module.' keys."""
    torch.manual_seed(seed)
    source = timm.create_model("vit_small_patch8_224.dino", pretrained=False, num_classes=0, **TINY_VIT)
    with torch.no_grad():
        for block in source.blocks:
            block.attn.qkv.bias.normal_()
    state_dict = {f"module.{k}": v.contiguous() for k, v in source.state_dict().items()}
    if str(path).endswith(".safetensors"):
        save_file(state_dict, str(path))
    else:
        torch.save(state_dict, str(path))
    return source.eval()


@pytest.mark.parametrize("file_name", ["dino.safetensors", "dino.pth"])
def test_discriminator_backbone_loads_from_file_with_key_bias_zeroed(tmp_path, file_name):
    source = write_backbone_file(tmp_path / file_name, seed=1)
    discriminator = DinoDiscriminator(backbone_kwargs=TINY_VIT, tap_blocks=TINY_TAPS)
    discriminator.load_backbone_weights(str(tmp_path / file_name))
    width = TINY_VIT["embed_dim"]
    for loaded, original in zip(discriminator.backbone.blocks, source.blocks):
        bias, original_bias = loaded.attn.qkv.bias, original.attn.qkv.bias
        assert torch.count_nonzero(bias[width : 2 * width]) == 0
        assert torch.equal(bias[:width], original_bias[:width]) and torch.equal(bias[2 * width :], original_bias[2 * width :])
        assert torch.equal(loaded.attn.qkv.weight, original.attn.qkv.weight)
    # Zeroing the key bias leaves attention, hence the features, unchanged.
    pixels = ((images() + 1) / 2 - discriminator.pixel_mean) / discriminator.pixel_std
    kwargs = dict(indices=[1, 3], norm=False, output_fmt="NLC", intermediates_only=True)
    for ours, reference in zip(
        discriminator.backbone.forward_intermediates(pixels, **kwargs), source.forward_intermediates(pixels, **kwargs)
    ):
        assert torch.allclose(ours, reference, atol=1e-5)


def test_discriminator_backbone_load_errors(tmp_path):
    discriminator = DinoDiscriminator(backbone_kwargs=TINY_VIT, tap_blocks=TINY_TAPS)
    with pytest.raises(FileNotFoundError):
        discriminator.load_backbone_weights(str(tmp_path / "absent.safetensors"))
    wrong = {k: v for k, v in discriminator.backbone.state_dict().items() if not k.startswith("blocks.3.")}
    save_file({k: v.contiguous() for k, v in wrong.items()}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        discriminator.load_backbone_weights(str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match="tap_blocks"):
        DinoDiscriminator(backbone_kwargs=TINY_VIT, tap_blocks=(1, 4))
    with pytest.raises(ValueError, match="odd"):
        DinoDiscriminator(backbone_kwargs=TINY_VIT, tap_blocks=TINY_TAPS, head_kernel_size=4)


def test_discriminator_save_pretrained_round_trip(tiny_discriminator, tmp_path):
    tiny_discriminator.save_pretrained(str(tmp_path))
    reloaded = DinoDiscriminator.from_pretrained(str(tmp_path))
    tiny_discriminator.eval()
    reloaded.eval()
    with torch.no_grad():
        expected, actual = tiny_discriminator(images()), reloaded(images())
    assert torch.allclose(actual, expected, atol=1e-5)


# ----------------------------------------------------------------------------- DiffAugment


def test_diffaugment_keeps_shape_and_is_reproducible_with_a_seed():
    augment = DiffAugment(cutout_ratio=0.25)
    x = images(batch=4, size=16)
    first = augment(x, torch.Generator().manual_seed(7))
    assert first.shape == x.shape
    assert torch.equal(first, augment(x, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, augment(x, torch.Generator().manual_seed(8)))
    x.requires_grad_(True)
    augment(x, torch.Generator().manual_seed(7)).sum().backward()
    assert x.grad.abs().sum() > 0


def test_diffaugment_shared_pair_applies_the_same_transform():
    augment = DiffAugment(cutout_ratio=0.2)
    real, fake = images(batch=4, size=16, seed=1), images(batch=4, size=16, seed=2)
    same_real, same_fake = augment.augment_pair(real, real.clone(), shared=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(same_real, same_fake)
    independent_real, independent_fake = augment.augment_pair(real, real.clone(), generator=torch.Generator().manual_seed(3))
    assert not torch.equal(independent_real, independent_fake)

    real_out, fake_out = augment.augment_pair(real, fake, shared=True, generator=torch.Generator().manual_seed(3))
    draw = augment.sample(4, 16, 16, torch.Generator().manual_seed(3))
    assert torch.equal(real_out, augment.apply(real, draw)) and torch.equal(fake_out, augment.apply(fake, draw))
    with pytest.raises(ValueError, match="same shape"):
        augment.augment_pair(real, fake[:2], shared=True)


def test_diffaugment_ops_match_hand_computation():
    augment = DiffAugment(cutout_ratio=0.25)
    x = images(batch=1, size=8)

    shift = AugmentationDraw(torch.tensor([[1, -2]]), None, None, None, None)
    expected = torch.zeros_like(x)
    expected[:, :, :7, 2:] = x[:, :, 1:, :6]  # out[i, j] = x[i + 1, j - 2]
    assert torch.equal(augment.apply(x, shift), expected)

    color = AugmentationDraw(None, torch.tensor([0.1]), torch.tensor([1.0]), torch.tensor([1.0]), None)
    assert torch.allclose(augment.apply(x, color), x + 0.1, atol=1e-6)
    grey = AugmentationDraw(None, torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([1.0]), None)
    assert torch.allclose(augment.apply(x, grey), x.mean(dim=1, keepdim=True).expand_as(x), atol=1e-6)

    cutout = AugmentationDraw(None, None, None, None, torch.tensor([[-1, 3]]))
    expected = x.clone()
    expected[:, :, 0:1, 3:5] = 0  # 2x2 square from row -1, column 3, clipped to the image
    assert torch.equal(augment.apply(x, cutout), expected)

    assert torch.equal(DiffAugment(probability=0.0)(x, torch.Generator().manual_seed(0)), x)
    with pytest.raises(ValueError, match="probability"):
        DiffAugment(probability=1.5)
