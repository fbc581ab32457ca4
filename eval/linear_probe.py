"""Linear probe of AutoencoderUAE features: top-1 accuracy of a logistic regression trained on one split and
scored on another (the paper's check that band 0 keeps the encoder's semantics).

    python eval/linear_probe.py --autoencoder UAE_DIR --train_data_dir imagenet/train --val_data_dir imagenet/val \
        --features band0 --out probe.json
    python eval/linear_probe.py --autoencoder UAE_DIR --dataset demo-digits --features band0 bands latent teacher

Features (each pooled to --pool x --pool and flattened, `uae_gen.metrics.pooled_features`):
  latent   the un-normalised latent z the decoder path works on (`encode_raw`, eval mode: no noise);
  band0    the lowest frequency band of z;  bands  all K bands, concatenated;
  teacher  the semantic encoder alone: weights from --teacher_encoder (timm hub name or file, e.g. the DINOv2 the
           UAE started from) when given, else the UAE's own encoder output, before any low-pass or band split.
"""

import argparse
import json
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from uae_gen import AutoencoderUAE
from uae_gen.data import ImageFolderDataset, load_demo_digits
from uae_gen.metrics import linear_probe_accuracy, pooled_features
from uae_gen.models.encoders import load_encoder_weights, make_teacher

FEATURES = ("band0", "bands", "latent", "teacher")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--autoencoder", required=True, help="AutoencoderUAE directory (from_pretrained).")
    parser.add_argument("--features", nargs="+", choices=FEATURES, default=["band0"])
    parser.add_argument("--dataset", choices=["demo-digits"], default=None,
                        help="Built-in offline set (train / heldout splits) instead of image folders.")
    parser.add_argument("--train_data_dir", default=None, help="ImageFolder root (root/<class>/*.jpg) to train on.")
    parser.add_argument("--val_data_dir", default=None, help="ImageFolder root with the same classes to score on.")
    parser.add_argument("--teacher_encoder", default=None, help="Encoder weights (timm hub name or file) for 'teacher'.")
    parser.add_argument("--max_images_per_split", type=int, default=None, help="Use the first N images of each split.")
    parser.add_argument("--pool", type=int, default=2, help="Pool every feature grid to pool x pool.")
    parser.add_argument("--max_iter", type=int, default=1000, help="Logistic-regression iterations.")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--out", default="linear_probe.json")
    args = parser.parse_args(argv)
    if (args.dataset is None) == (args.train_data_dir is None or args.val_data_dir is None):
        parser.error("give either --dataset or both --train_data_dir and --val_data_dir")
    return args


def load_splits(args: argparse.Namespace, image_size: int):
    if args.dataset == "demo-digits":
        splits = load_demo_digits("train", image_size), load_demo_digits("heldout", image_size)
    else:
        splits = ImageFolderDataset(args.train_data_dir, image_size), ImageFolderDataset(args.val_data_dir, image_size)
        if splits[0].classes != splits[1].classes:
            raise ValueError(f"train and val folders have different classes: {splits[0].classes[:5]}... vs "
                             f"{splits[1].classes[:5]}...")
    if args.max_images_per_split is not None:
        splits = tuple(Subset(split, range(min(args.max_images_per_split, len(split)))) for split in splits)
    return splits


@torch.no_grad()
def extract(model: AutoencoderUAE, teacher, dataset, features, pool: int, batch_size: int, device, desc: str):
    """Pooled features of every image: {name: (N, D)} and the labels (N,)."""
    collected = {name: [] for name in features}
    labels = []
    for images, batch_labels in tqdm(DataLoader(dataset, batch_size=batch_size), desc=desc, unit="batch"):
        images = images.to(device)
        z = model.encode_raw(images)
        bands = model.split_bands(z)
        grids = {"latent": lambda: z, "band0": lambda: bands[:, 0], "bands": lambda: bands,
                 "teacher": lambda: teacher(images)}
        for name in features:
            collected[name].append(pooled_features(grids[name](), pool))
        labels.append(torch.as_tensor(batch_labels))
    return {name: torch.cat(parts) for name, parts in collected.items()}, torch.cat(labels)


def main(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoencoderUAE.from_pretrained(args.autoencoder).to(device).eval()
    teacher = model.encoder
    if args.teacher_encoder is not None:
        teacher = load_encoder_weights(make_teacher(model.encoder), args.teacher_encoder).to(device)
    train_split, val_split = load_splits(args, model.config.image_size)
    train, train_labels = extract(model, teacher, train_split, args.features, args.pool, args.batch_size, device,
                                  "train features")
    val, val_labels = extract(model, teacher, val_split, args.features, args.pool, args.batch_size, device,
                              "val features")
    accuracy = {name: linear_probe_accuracy(train[name], train_labels, val[name], val_labels, max_iter=args.max_iter)
                for name in args.features}
    num_classes = int(torch.cat([train_labels, val_labels]).max()) + 1
    results = {
        "top1": accuracy,
        "chance": 1.0 / num_classes,
        "feature_dims": {name: train[name].shape[1] for name in args.features},
        "settings": {
            "autoencoder": os.path.abspath(args.autoencoder),
            "teacher_encoder": args.teacher_encoder or "the autoencoder's own encoder",
            "data": args.dataset or {"train": os.path.abspath(args.train_data_dir),
                                     "val": os.path.abspath(args.val_data_dir)},
            "num_train": len(train_labels), "num_val": len(val_labels), "num_classes": num_classes,
            "image_size": model.config.image_size, "pool": args.pool, "max_iter": args.max_iter,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(" | ".join(f"{name} top-1 {value:.4f}" for name, value in accuracy.items()) + f" (chance {1 / num_classes:.4f})")
    return results


if __name__ == "__main__":
    main(parse_args())
