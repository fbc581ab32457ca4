"""ImageNet-layout image folder with the ADM / DiT centre crop.

`root/<class_name>/**/<image>` -> (image tensor in [-1, 1], shape (3, H, W), float32; integer label). Class
names are sorted to give label ids, as torchvision's ImageFolder and the DiT / RAE training scripts do.

Unreadable files: the folder is listed at construction, and each image is decoded when it is first used. A file
PIL cannot decode is logged, remembered and replaced by the next readable sample, and `num_skipped` /
`skipped_paths` count it. With DataLoader workers each worker keeps its own count, so the main process sees
only what it decoded itself. For small sets, `verify_images=True` decodes every file at construction and drops
the bad ones, so every index is a distinct readable image.
"""

import logging
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def adm_center_crop(image: Image.Image, image_size: int) -> Image.Image:
    """Centre-crop `image` to `image_size` x `image_size` the way ADM (guided-diffusion) and DiT do.

    Halve with a box filter while the short side is at least twice the target (cheap anti-aliasing), resize
    bicubically so the short side equals `image_size`, then cut the centre square.
    """
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.Resampling.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.Resampling.BICUBIC)
    left = (image.width - image_size) // 2
    top = (image.height - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1] (the diffusers image convention)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()


def _load_rgb(path: str) -> Image.Image:
    # convert() forces a full decode, so truncated files fail here and not later in a worker.
    with Image.open(path) as image:
        return image.convert("RGB")


class ImageFolderDataset(Dataset):
    """Class-labelled images under `root/<class_name>/`, centre-cropped to `image_size` (ADM crop)."""

    def __init__(self, root: str, image_size: int, random_flip: bool = False, verify_images: bool = False):
        if image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size}")
        if not os.path.exists(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist")
        if not os.path.isdir(root):
            raise ValueError(f"image folder {root!r} is not a directory")
        self.root = root
        self.image_size = image_size
        self.random_flip = random_flip

        self.classes = sorted(
            entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith(".")
        )
        if not self.classes:
            raise ValueError(f"image folder {root!r} has no class sub-folders (expected root/<class_name>/*.jpg)")
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}

        self.samples: list[tuple[str, int]] = []
        empty_classes = []
        for name in self.classes:
            paths = self._list_images(os.path.join(root, name))
            if not paths:
                empty_classes.append(name)
            self.samples.extend((path, self.class_to_idx[name]) for path in paths)
        if empty_classes:
            raise ValueError(
                f"image folder {root!r}: class folder(s) {empty_classes} contain no images with extensions "
                f"{IMAGE_EXTENSIONS}"
            )

        self.skipped_paths: list[str] = []
        self._unreadable: set[int] = set()
        if verify_images:
            self._drop_unreadable()

    @staticmethod
    def _list_images(class_dir: str) -> list[str]:
        paths = []
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            paths.extend(
                os.path.join(dirpath, name)
                for name in sorted(filenames)
                if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")
            )
        return paths

    def _drop_unreadable(self) -> None:
        readable = []
        for path, label in self.samples:
            try:
                _load_rgb(path)
            except OSError as error:
                logger.warning("skipping unreadable image %s: %s", path, error)
                self.skipped_paths.append(path)
                continue
            readable.append((path, label))
        if not readable:
            raise ValueError(f"image folder {self.root!r}: none of its {len(self.samples)} images can be decoded")
        self.samples = readable

    @property
    def num_skipped(self) -> int:
        """How many unreadable files this process has skipped so far."""
        return len(self.skipped_paths)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.classes))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # Walk forward from `index` to the first readable file; a bad file is decoded (and counted) only once.
        for offset in range(len(self.samples)):
            position = (index + offset) % len(self.samples)
            if position in self._unreadable:
                continue
            path, label = self.samples[position]
            try:
                image = _load_rgb(path)
            except OSError as error:
                logger.warning("skipping unreadable image %s: %s", path, error)
                self._unreadable.add(position)
                self.skipped_paths.append(path)
                continue
            image = adm_center_crop(image, self.image_size)
            if self.random_flip and torch.rand(()) < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            return pil_to_tensor(image), label
        raise ValueError(f"image folder {self.root!r}: none of its {len(self.samples)} images can be decoded")
