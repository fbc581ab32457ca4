"""Built-in offline demo data set: scikit-learn digits composited on scikit-image texture photos.

Each of the 1797 8x8 handwritten digits is upscaled (bicubic) to `image_size` and used as the alpha mask that
blends a digit colour over a background colour (one dark, one bright, randomly assigned). The fine detail (a
high-pass) of a random crop of one of three grey texture photos that ship inside scikit-image (brick, grass,
gravel) is added on top. The class lives in the low frequencies (a smooth digit shape) while the high frequencies
carry real photographic texture, the split a frequency-band latent is meant to exploit. Nothing is downloaded
and nothing is cached on disk; building it takes about a second.

The train / held-out split is fixed (stratified 80/20, independent of `seed`); `seed` only changes the
appearance (colours, texture crops), and sample i looks the same whichever split it falls in.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

NUM_DIGIT_CLASSES = 10
TEXTURE_NAMES = ("brick", "grass", "gravel")
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0  # fixed so that "heldout" means the same images in every run
TEXTURE_CONTRAST = 0.12  # std of the texture detail added around each colour, in [0, 1] image units
TEXTURE_BLUR_SIGMA = 1.5  # pixels; the texture keeps only detail finer than this (a high-pass)


class DemoDigits(Dataset):
    """Tensors of one split of the demo set: `images` (N, 3, S, S) in [-1, 1] and `labels` (N,) int64."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, split: str):
        self.images = images
        self.labels = labels
        self.split = split
        self.classes = [f"digit {digit}" for digit in range(NUM_DIGIT_CLASSES)]
        self.num_classes = NUM_DIGIT_CLASSES

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.classes))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


def _load_textures() -> np.ndarray:
    """High-pass detail of the three grey texture photos, float32 (3, 512, 512), each with unit std.

    Removing the blurred photo leaves only fine detail, so the texture adds high frequencies and does not
    compete with the digit's low-frequency shape.
    """
    import skimage.data
    from scipy.ndimage import gaussian_filter

    textures = np.stack([getattr(skimage.data, name)().astype(np.float32) for name in TEXTURE_NAMES])
    detail = textures - gaussian_filter(textures, sigma=(0, TEXTURE_BLUR_SIGMA, TEXTURE_BLUR_SIGMA))
    return detail / detail.std(axis=(1, 2), keepdims=True)


def _heldout_mask(labels: np.ndarray) -> np.ndarray:
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    _, heldout = train_test_split(indices, test_size=HELDOUT_FRACTION, stratify=labels, random_state=SPLIT_SEED)
    mask = np.zeros(len(labels), dtype=bool)
    mask[heldout] = True
    return mask


def _render(digits: np.ndarray, image_size: int, seed: int) -> torch.Tensor:
    """digits (N, 8, 8) in [0, 16] -> composited colour images (N, 3, S, S) in [-1, 1]."""
    rng = np.random.default_rng(seed)
    count = len(digits)
    textures = _load_textures()

    # Digit shape as an alpha mask: a smooth, low-frequency blob.
    alpha = F.interpolate(torch.from_numpy(digits / 16.0).float()[:, None], size=image_size, mode="bicubic")
    alpha = alpha.clamp(0.0, 1.0)

    # One random texture crop per image, shared by digit and background so the detail runs through both.
    which = rng.integers(0, len(textures), count)
    top = rng.integers(0, textures.shape[1] - image_size + 1, count)
    left = rng.integers(0, textures.shape[2] - image_size + 1, count)
    offsets = np.arange(image_size)
    rows = (top[:, None] + offsets)[:, :, None]
    cols = (left[:, None] + offsets)[:, None, :]
    detail = torch.from_numpy(textures[which[:, None, None], rows, cols])[:, None] * TEXTURE_CONTRAST

    # A dark and a bright colour per image; which one the digit gets is random, so contrast never vanishes.
    dark = torch.from_numpy(rng.uniform(0.05, 0.4, (count, 3, 1, 1))).float()
    bright = torch.from_numpy(rng.uniform(0.6, 0.95, (count, 3, 1, 1))).float()
    digit_is_bright = torch.from_numpy(rng.random(count) < 0.5)[:, None, None, None]
    foreground = torch.where(digit_is_bright, bright, dark)
    background = torch.where(digit_is_bright, dark, bright)

    image = alpha * foreground + (1.0 - alpha) * background + detail
    return image.clamp(0.0, 1.0).mul(2.0).sub(1.0).contiguous()


def load_demo_digits(split: str = "train", image_size: int = 32, seed: int = 0) -> DemoDigits:
    """Build the demo set in memory (about a second) and return one split.

    split: "train" (1437 images) or "heldout" (360 images); every class appears in both.
    image_size: side of the square output, 8..512.
    seed: appearance seed (colours, texture crops); the same seed gives identical tensors.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if not 8 <= image_size <= 512:
        raise ValueError(f"image_size must be between 8 and 512 (the texture photos are 512 px), got {image_size}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    images = _render(digits.images, image_size, seed)
    keep = _heldout_mask(labels)
    if split == "train":
        keep = ~keep
    keep = torch.from_numpy(keep)
    return DemoDigits(images[keep], torch.from_numpy(labels)[keep], split)
