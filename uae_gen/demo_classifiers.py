"""The demo's two classifiers of the digits, both taking [-1, 1] images:

* the teacher: the tiny preset's DINOv2-architecture ViT (``SemanticEncoder``) with a linear head on its mean
  token, trained as a classifier. Its encoder plays DINOv2's role: the tokenizer starts from it and stage 2 keeps
  band 0 close to it. A ViT needs many more images than the 1437 training digits, so it sees every training digit
  rendered in ``TEACHER_APPEARANCES`` appearances (colours, texture crops) with random shifts.
* the judge: timm ``resnet10t``, another family, trained separately and never seen by the tokenizer or the
  generator. It scores generated samples (class accuracy) and gives the feature space of the judge-FID.
"""

from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .models.autoencoder_uae import UAE_PRESETS
from .models.encoders import IMAGENET_MEAN, IMAGENET_STD, SemanticEncoder

TEACHER_APPEARANCES = 10  # renderings of the training digits the teacher sees (demo_digits `seed` 0..9)
WARMUP_FRACTION = 0.1


class Judge(nn.Module):
    """resnet10t on ImageNet-normalised input; `features` are its pooled pre-logits."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.net = timm.create_model("resnet10t", pretrained=False, num_classes=num_classes)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = ((images + 1) / 2 - self.pixel_mean) / self.pixel_std
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.get_classifier()(self.features(images))


class TeacherClassifier(nn.Module):
    """A SemanticEncoder with a linear head on its mean (normalised) token: training it shapes the token grid
    the UAE encodes with."""

    def __init__(self, encoder: SemanticEncoder, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.hidden_size, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def build_teacher(num_classes: int, preset: str = "tiny") -> TeacherClassifier:
    """The encoder architecture of an AutoencoderUAE preset, with layer scale starting at 1: DINOv2's 1e-5
    start (meant for long pre-training) leaves a freshly initialised tiny ViT nearly linear for hundreds of steps."""
    config = UAE_PRESETS[preset]
    encoder = SemanticEncoder(input_size=config["encoder_input_size"],
                              model_kwargs={**config["encoder_kwargs"], "init_values": 1.0})
    return TeacherClassifier(encoder, num_classes)


def train_classifier(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, batch_size: int = 64,
    learning_rate: float = 2e-3, seed: int = 0, description: str = "classifier",
) -> nn.Module:
    """AdamW, linear warmup then cosine decay, random shifts of up to 2 px (digits are not flip-invariant);
    returns the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.05, fused=True)
    warmup = max(1, round(WARMUP_FRACTION * steps))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    for _ in tqdm(range(steps), desc=description, leave=False):
        index = torch.randint(len(images), (batch_size,), generator=generator)
        shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
        x = torch.roll(images[index], shifts=shift, dims=(2, 3))
        loss = F.cross_entropy(model(x), labels[index], label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Class logits (N, num_classes) for [-1, 1] images."""
    return torch.cat([model(chunk) for chunk in images.split(batch_size)])


@torch.no_grad()
def classifier_features(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Pooled pre-logit features (N, D): the judge's feature space for FID."""
    return torch.cat([model.features(chunk) for chunk in images.split(batch_size)])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()
