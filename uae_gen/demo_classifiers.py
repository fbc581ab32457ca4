"""The demo's judge: a separately trained classifier of another family (timm ``resnet10t``) than the UAE encoder,
never seen by the generator. It scores generated samples (class accuracy) and provides the feature space of the
judge-FID."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm



def build_judge(num_classes: int) -> nn.Module:
    return timm.create_model("resnet10t", pretrained=False, num_classes=num_classes)


def imagenet_normalize(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> the ImageNet-normalised input the judge is trained on (as the UAE encoder sees)."""
    mean = torch.tensor([0.485, 0.456, 0.406], device=images.device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=images.device).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


def train_classifier(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, batch_size: int = 64,
    learning_rate: float = 2e-3, seed: int = 0, description: str = "classifier",
) -> nn.Module:
    """AdamW with cosine decay and random flips/shifts; returns the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in tqdm(range(steps), desc=description, leave=False):
        index = torch.randint(len(images), (batch_size,), generator=generator)
        x = images[index]
        shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
        x = torch.roll(x, shifts=shift, dims=(2, 3))  # small translations: digits are not flip-invariant
        loss = F.cross_entropy(model(imagenet_normalize(x)), labels[index], label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Class logits (N, num_classes) for [-1, 1] images."""
    return torch.cat([model(imagenet_normalize(chunk)) for chunk in images.split(batch_size)])


@torch.no_grad()
def penultimate_features(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Pooled pre-logit features (N, D): the judge's feature space for FID."""
    return torch.cat(
        [model.forward_head(model.forward_features(imagenet_normalize(c)), pre_logits=True) for c in images.split(batch_size)]
    )


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()
