"""Data sets and label sampling shared by the trainers, the evaluation scripts and the demo."""

from .class_labels import balanced_class_labels, random_class_labels
from .demo_digits import DemoDigits, load_demo_digits
from .image_folder import IMAGE_EXTENSIONS, ImageFolderDataset, adm_center_crop, pil_to_tensor

__all__ = [
    "IMAGE_EXTENSIONS",
    "DemoDigits",
    "ImageFolderDataset",
    "adm_center_crop",
    "balanced_class_labels",
    "load_demo_digits",
    "pil_to_tensor",
    "random_class_labels",
]
