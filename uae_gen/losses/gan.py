"""Adversarial losses for autoencoder training: discriminator and generator losses on logits, the
adaptive generator weight of VQGAN/taming, and the schedule that starts the GAN part late.

Logits may have any shape (the DINO discriminator gives one per token per feature map); every loss
is a mean over all of them. Total generator objective in the official recipe:

    L = L_rec_total + generator_weight * lambda * L_G,   lambda = adaptive_generator_weight(L_rec_total, L_G, W)
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]); the official default ("hinge_d_loss")."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[softplus(-D(x))] + E[softplus(D(x_hat))]): binary cross-entropy on logits ("vanilla_d_loss")."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-E[D(x_hat)], the generator side of the hinge GAN.

    This is what the official UAE/RAE code calls `vanilla_g_loss` and uses in every recipe.
    """
    return -logits_fake.mean()


def non_saturating_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """E[softplus(-D(x_hat))] = -E[log sigmoid(D(x_hat))], the non-saturating loss of the original GAN."""
    return F.softplus(-logits_fake).mean()


def adaptive_generator_weight(
    reconstruction_loss: torch.Tensor,
    generator_loss: torch.Tensor,
    last_layer_weight: torch.Tensor,
    max_weight: float = 1e4,
    eps: float = 1e-6,
) -> torch.Tensor:
    """lambda = ||grad_W L_rec|| / (||grad_W L_G|| + eps), clamped to [0, max_weight] and detached.

    W is the weight of the decoder's last layer (`decoder_pred.weight` in the official code); the
    ratio balances the adversarial gradient against the reconstruction gradient where they meet.
    Both graphs are kept (retain_graph) so the caller can still backpropagate the total loss.
    """
    reconstruction_grad = torch.autograd.grad(
        reconstruction_loss, last_layer_weight, retain_graph=True, allow_unused=True
    )[0]
    generator_grad = torch.autograd.grad(generator_loss, last_layer_weight, retain_graph=True, allow_unused=True)[0]
    if reconstruction_grad is None or generator_grad is None:
        raise ValueError(
            "adaptive_generator_weight: last_layer_weight does not take part in "
            f"{'the reconstruction loss' if reconstruction_grad is None else 'the generator loss'}"
        )
    weight = reconstruction_grad.norm() / (generator_grad.norm() + eps)
    return weight.clamp(0.0, max_weight).detach()


def quantize_to_uint8_grid(images: torch.Tensor) -> torch.Tensor:
    """Clamp [-1, 1] images and round them to the 256 levels of a saved 8-bit image.

    The official D step sees fakes quantised like the real images it is given, so it cannot tell
    them apart by sub-level values alone.
    """
    return torch.round((images.clamp(-1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


@dataclass
class GANLossSchedule:
    """When the GAN part is on, in optimisation steps.

    Before `discriminator_start_step` the discriminator is not updated; before `generator_start_step`
    the adversarial term has weight 0 in the generator loss, afterwards `generator_weight` (times the
    adaptive weight). The official recipes start D updates at epoch 6 and the G term at epoch 8
    (v2 / RAE), with generator_weight 0.75.
    """

    discriminator_start_step: int = 0
    generator_start_step: int = 0
    generator_weight: float = 0.75

    def __post_init__(self):
        if self.discriminator_start_step < 0 or self.generator_start_step < 0 or self.generator_weight < 0:
            raise ValueError(f"GANLossSchedule values must be non-negative, got {self}")

    def update_discriminator(self, step: int) -> bool:
        """Whether the discriminator takes an optimisation step at `step`."""
        return step >= self.discriminator_start_step

    def generator_adversarial_weight(self, step: int) -> float:
        """Weight of the (adaptively weighted) adversarial term in the generator loss at `step`."""
        return self.generator_weight if step >= self.generator_start_step else 0.0
