"""uae_gen.data: image folder with the ADM crop, the offline demo digits set, class-label sampling."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from uae_gen.data import (
    ImageFolderDataset,
    adm_center_crop,
    balanced_class_labels,
    load_demo_digits,
    random_class_labels,
)


def _write_png(path, width, height, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def image_root(tmp_path):
    """Two classes ("cat" listed before "dog"), non-square images of several sizes."""
    root = tmp_path / "train"
    for name, sizes in {"dog": [(40, 23), (17, 30)], "cat": [(64, 64), (33, 70), (20, 20)]}.items():
        (root / name).mkdir(parents=True)
        for index, (width, height) in enumerate(sizes):
            _write_png(root / name / f"{index}.png", width, height, seed=index + len(name))
    return root


def test_image_folder_labels_shapes_and_range(image_root):
    dataset = ImageFolderDataset(str(image_root), image_size=16)
    assert dataset.classes == ["cat", "dog"]
    assert dataset.class_to_idx == {"cat": 0, "dog": 1}
    assert dataset.id2label == {0: "cat", 1: "dog"}
    assert len(dataset) == 5
    labels = []
    for index in range(len(dataset)):
        image, label = dataset[index]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        assert image.min() >= -1.0 and image.max() <= 1.0
        labels.append(label)
    assert labels == [0, 0, 0, 1, 1]
    assert dataset.num_skipped == 0


def test_image_folder_pixels_equal_hand_computed_crop(image_root):
    dataset = ImageFolderDataset(str(image_root), image_size=16)
    path, _ = dataset.samples[3]  # dog/0.png, 40 x 23
    source = np.asarray(Image.open(path).convert("RGB"))
    # 23 < 32: no box halving; bicubic to (round(40*16/23), 16) = (28, 16); centre crop starts at x = 6.
    resized = np.asarray(Image.fromarray(source).resize((28, 16), Image.Resampling.BICUBIC), dtype=np.float32)
    expected = torch.from_numpy(resized[:, 6:22] / 127.5 - 1.0).permute(2, 0, 1)
    torch.testing.assert_close(dataset[3][0], expected)


def test_adm_crop_box_halving_and_offset_by_hand():
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (8, 16, 3)).astype(np.uint8)  # H=8, W=16
    cropped = np.asarray(adm_center_crop(Image.fromarray(source), 4), dtype=np.float32)
    # min side 8 >= 2*4: one box halving to 8x4 (2x2 means); the bicubic step is then a no-op (short side is 4);
    # the centre crop takes columns (8-4)//2 = 2 .. 5. PIL's fixed-point box filter may be off by one grey level.
    block_means = source.astype(np.float32).reshape(4, 2, 8, 2, 3).mean(axis=(1, 3))
    assert cropped.shape == (4, 4, 3)
    np.testing.assert_allclose(cropped, block_means[:, 2:6], atol=1.0)
    assert np.abs(cropped - block_means[:, 1:5]).max() > 20  # a crop one column off would not match


@pytest.mark.parametrize("width,height", [(300, 97), (61, 200), (33, 33), (10, 7)])
def test_adm_crop_output_size_for_any_aspect(width, height):
    image = Image.new("RGB", (width, height), (10, 200, 30))
    cropped = adm_center_crop(image, 24)
    assert cropped.size == (24, 24)
    np.testing.assert_allclose(np.asarray(cropped), np.broadcast_to([10, 200, 30], (24, 24, 3)), atol=1)


def test_random_flip_mirrors_the_crop(image_root):
    plain = ImageFolderDataset(str(image_root), image_size=16)
    flipping = ImageFolderDataset(str(image_root), image_size=16, random_flip=True)
    reference = plain[0][0]
    torch.manual_seed(0)
    seen = {bool(torch.equal(flipping[0][0], reference.flip(-1))) for _ in range(20)}
    assert seen == {True, False}
    for _ in range(10):
        image = flipping[0][0]
        assert torch.equal(image, reference) or torch.equal(image, reference.flip(-1))


def test_image_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolderDataset(str(tmp_path / "missing"), image_size=8)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderDataset(str(empty), image_size=8)
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    _write_png(root / "a" / "x.png", 9, 9, seed=0)
    (root / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"\['b'\]"):
        ImageFolderDataset(str(root), image_size=8)


def test_corrupt_file_is_skipped_and_counted(image_root):
    corrupt = image_root / "cat" / "1b_corrupt.png"  # sorts right after cat/1.png
    corrupt.write_bytes(os.urandom(200))
    dataset = ImageFolderDataset(str(image_root), image_size=16)
    assert len(dataset) == 6  # listed, not yet decoded
    corrupt_index = [path for path, _ in dataset.samples].index(str(corrupt))
    image, label = dataset[corrupt_index]
    next_image, next_label = dataset[corrupt_index + 1]
    assert torch.equal(image, next_image) and label == next_label == 0  # substituted by the next readable file
    assert dataset.num_skipped == 1 and dataset.skipped_paths == [str(corrupt)]
    for index in range(len(dataset)):
        dataset[index]
    assert dataset.num_skipped == 1  # counted once

    verified = ImageFolderDataset(str(image_root), image_size=16, verify_images=True)
    assert len(verified) == 5 and verified.num_skipped == 1
    assert str(corrupt) not in [path for path, _ in verified.samples]


def test_demo_digits_split_and_determinism():
    train = load_demo_digits("train", seed=0)
    heldout = load_demo_digits("heldout", seed=0)
    assert len(train) + len(heldout) == 1797
    assert len(heldout) == 360  # stratified 20 %
    assert train.images.shape == (len(train), 3, 32, 32) and train.images.dtype == torch.float32
    for split in (train, heldout):
        assert split.images.min() >= -1.0 and split.images.max() <= 1.0
        assert sorted(set(split.labels.tolist())) == list(range(10))
    assert train.id2label[3] == "digit 3" and train.num_classes == 10
    image, label = train[5]
    assert image.shape == (3, 32, 32) and isinstance(label, int) and label == int(train.labels[5])

    # Disjoint: no held-out image also appears in train (images are distinct per digit sample).
    train_keys = {row.numpy().tobytes() for row in train.images.flatten(1)}
    assert not any(row.numpy().tobytes() in train_keys for row in heldout.images.flatten(1))

    again = load_demo_digits("train", seed=0)
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    other_seed = load_demo_digits("train", seed=1)
    assert torch.equal(other_seed.labels, train.labels)  # the split does not depend on the seed
    assert not torch.equal(other_seed.images, train.images)


def _unit_band_features(images, band):
    """Grey images -> per-image normalised low-pass (4x4 blocks) or high-pass (the rest) pixels."""
    grey = images.mean(1, keepdim=True)
    low = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(grey, 4), scale_factor=4, mode="bilinear")
    features = (low if band == "low" else grey - low).flatten(1)
    features = features - features.mean(1, keepdim=True)
    return features / features.norm(dim=1, keepdim=True)


def test_demo_digits_class_lives_in_low_frequencies():
    train, heldout = load_demo_digits("train"), load_demo_digits("heldout")
    # 1-nearest-neighbour on the low-pass image alone recognises held-out digits (chance is 0.1). The digit
    # may be brighter or darker than its background, so a neighbour counts with either sign.
    reference, query = _unit_band_features(train.images, "low"), _unit_band_features(heldout.images, "low")
    distance = torch.minimum(torch.cdist(query, reference), torch.cdist(query, -reference))
    accuracy = (train.labels[distance.argmin(1)] == heldout.labels).float().mean()
    assert accuracy > 0.85
    # The high-pass residual carries texture detail: digit edges alone give a residual std of about 0.13.
    grey = train.images.mean(1, keepdim=True)
    residual = grey - torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(grey, 4), scale_factor=4)
    assert residual.std() > 0.18


def test_demo_digits_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        load_demo_digits("test")
    with pytest.raises(ValueError, match="image_size"):
        load_demo_digits("train", image_size=4)


def test_balanced_class_labels():
    labels = balanced_class_labels(50, 10, seed=3)
    assert labels.dtype == torch.int64 and labels.shape == (50,)
    assert torch.bincount(labels, minlength=10).tolist() == [5] * 10
    assert torch.equal(labels, balanced_class_labels(50, 10, seed=3))
    assert not torch.equal(labels, balanced_class_labels(50, 10, seed=4))
    assert not torch.equal(labels, labels.sort().values)  # shuffled
    with pytest.raises(ValueError, match="divisible"):
        balanced_class_labels(51, 10)


def test_random_class_labels():
    labels = random_class_labels(2000, 7, seed=1)
    assert labels.min() >= 0 and labels.max() <= 6
    assert torch.bincount(labels, minlength=7).min() > 200  # roughly uniform (expected 286 each)
    assert torch.equal(labels, random_class_labels(2000, 7, seed=1))
    with pytest.raises(ValueError, match="num_classes"):
        random_class_labels(5, 0)
