"""Class labels to condition generation on when sampling for evaluation.

`balanced_class_labels` gives every class exactly the same number of samples (the 50-per-class ImageNet
protocol of ADM / RAE sampling); `random_class_labels` draws uniformly at random as DiT's sample_ddp.py does.
Both are reproducible from `seed` alone and return int64 tensors, so every rank can build the same list and take
its own shard.
"""

import torch


def _check_counts(num_samples: int, num_classes: int) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be non-negative, got {num_samples}")


def balanced_class_labels(num_samples: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Exactly num_samples / num_classes labels of each class, in a seed-determined random order."""
    _check_counts(num_samples, num_classes)
    if num_samples % num_classes:
        raise ValueError(
            f"balanced labels need num_samples divisible by num_classes, got {num_samples} samples for "
            f"{num_classes} classes"
        )
    labels = torch.arange(num_classes).repeat_interleave(num_samples // num_classes)
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return labels[order]


def random_class_labels(num_samples: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """num_samples labels drawn independently and uniformly from range(num_classes)."""
    _check_counts(num_samples, num_classes)
    return torch.randint(0, num_classes, (num_samples,), generator=torch.Generator().manual_seed(seed))
