"""Sample grids for training logs: a batch of images -> one PNG, optionally with a caption under each tile.

The PNG is written to a temporary file in the same folder and moved into place with os.replace, so a reader
(or a crash) never sees half a file.
"""

import math
import os
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

GRID_PADDING = 2  # pixels of white between and around tiles
CAPTION_HEIGHT = 12  # pixels of caption strip under each tile when labels are given


def _to_uint8(images: torch.Tensor, value_range: tuple[float, float]) -> np.ndarray:
    low, high = value_range
    if high <= low:
        raise ValueError(f"value_range must be (low, high) with low < high, got {value_range}")
    scaled = (images.detach().float().cpu() - low) / (high - low)
    scaled = scaled.mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
    if scaled.shape[1] == 1:
        scaled = scaled.expand(-1, 3, -1, -1)
    return scaled.permute(0, 2, 3, 1).numpy()


def save_image_grid(
    images: torch.Tensor,
    path: str,
    nrow: Optional[int] = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
    labels: Optional[Sequence[str]] = None,
) -> None:
    """Write images (N, 3 or 1, H, W) as a PNG grid with `nrow` tiles per row (default about sqrt(N)).

    value_range: what the pixel values span, (-1, 1) for model outputs or (0, 1); values outside are clipped.
    labels: one caption per image, drawn under its tile (columns widen to fit the longest caption).
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, 3 or 1, H, W) tensor, got shape {tuple(images.shape)}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"got {len(labels)} labels for {len(images)} images")
    tiles = _to_uint8(images, value_range)
    count, height, width = tiles.shape[:3]
    nrow = nrow or math.ceil(math.sqrt(count))
    if nrow < 1:
        raise ValueError(f"nrow must be at least 1, got {nrow}")
    rows = math.ceil(count / nrow)

    font = ImageFont.load_default()
    cell_width, cell_height = width, height
    if labels is not None:
        cell_width = max(width, max(math.ceil(font.getlength(str(label))) for label in labels))
        cell_height = height + CAPTION_HEIGHT
    canvas = Image.new(
        "RGB",
        (nrow * (cell_width + GRID_PADDING) + GRID_PADDING, rows * (cell_height + GRID_PADDING) + GRID_PADDING),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    for index, tile in enumerate(tiles):
        row, column = divmod(index, nrow)
        left = GRID_PADDING + column * (cell_width + GRID_PADDING)
        top = GRID_PADDING + row * (cell_height + GRID_PADDING)
        canvas.paste(Image.fromarray(tile), (left, top))
        if labels is not None:
            draw.text((left, top + height), str(labels[index]), fill="black", font=font)

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # open() rather than mkstemp: mkstemp creates 0600 files, and a grid should be readable like any new file.
    temp_path = os.path.join(directory, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        with open(temp_path, "wb") as file:
            canvas.save(file, format="PNG")
        os.replace(temp_path, path)
    finally:
        if os.path.exists(temp_path):
            os.unlink(temp_path)
