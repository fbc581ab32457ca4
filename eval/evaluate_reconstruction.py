"""Reconstruction quality of an AutoencoderUAE over an image folder: PSNR, SSIM, rFID (and LPIPS when VGG16
weights are given), the RAE / UAE tokenizer evaluation.

    python eval/evaluate_reconstruction.py --autoencoder UAE_DIR --data_dir imagenet/val \
        --inception_weights weights-inception-2015-12-05-6726825d.pth --out_dir recon_eval

Images (a class-folder tree root/<class>/*.jpg or a flat folder) are ADM-centre-cropped to the model's
image_size, reconstructed in eval mode (no band noise), and both sides rounded to 8-bit as saved PNGs would be.
PSNR / SSIM are per-image means (`uae_gen.metrics.psnr`, `ssim`); rFID is the FID of the reconstructions
(input1) against the originals (input2) on torch-fidelity Inception features; LPIPS is the VGG16 LPIPS mean.
Writes `out_dir/reconstruction_metrics.json` and `out_dir/reconstructions.png` (the first --num_visualize
originals in the top row, their reconstructions below).
"""

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from uae_gen import AutoencoderUAE
from uae_gen.data import IMAGE_EXTENSIONS, ImageFolderDataset, adm_center_crop, pil_to_tensor
from uae_gen.losses import LPIPS
from uae_gen.metrics import compute_generation_metrics, images_to_uint8, psnr, ssim
from uae_gen.training import save_image_grid


class FlatImageFolder(Dataset):
    """Every image directly inside `root` (no classes), ADM-centre-cropped to `image_size`, in [-1, 1]."""

    def __init__(self, root: str, image_size: int):
        self.paths = sorted(os.path.join(root, name) for name in os.listdir(root)
                            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."))
        if not self.paths:
            raise ValueError(f"folder {root!r} has no images with extensions {IMAGE_EXTENSIONS}")
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[index]) as image:
            return pil_to_tensor(adm_center_crop(image.convert("RGB"), self.image_size)), 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--autoencoder", required=True, help="AutoencoderUAE directory (from_pretrained).")
    parser.add_argument("--data_dir", required=True, help="Image folder: root/<class>/*.jpg or flat.")
    parser.add_argument("--out_dir", default="reconstruction_eval")
    parser.add_argument("--max_images", type=int, default=None, help="Use the first N images.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--inception_weights", default=None,
                        help="Local torch-fidelity Inception weights (.pth) for offline rFID; default: download.")
    parser.add_argument("--no_rfid", action="store_true", help="Skip rFID (it needs Inception weights).")
    parser.add_argument("--lpips_vgg_weights", default=None, help="Local torchvision vgg16 weights: adds LPIPS.")
    parser.add_argument("--lpips_linear_weights", default=None,
                        help="LPIPS linear layers file; default: the copy inside the lpips package.")
    parser.add_argument("--num_visualize", type=int, default=8, help="Image pairs in reconstructions.png.")
    return parser.parse_args(argv)


def load_images(data_dir: str, image_size: int, max_images):
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"image folder {data_dir!r} does not exist")
    has_classes = any(entry.is_dir() and not entry.name.startswith(".") for entry in os.scandir(data_dir))
    dataset = ImageFolderDataset(data_dir, image_size) if has_classes else FlatImageFolder(data_dir, image_size)
    if max_images is not None:
        dataset = Subset(dataset, range(min(max_images, len(dataset))))
    return dataset


@torch.no_grad()
def main(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoencoderUAE.from_pretrained(args.autoencoder).to(device).eval()
    lpips = None
    if args.lpips_vgg_weights is not None:
        lpips = LPIPS(args.lpips_vgg_weights, args.lpips_linear_weights).to(device)
    dataset = load_images(args.data_dir, model.config.image_size, args.max_images)

    psnr_values, ssim_values, lpips_values, originals, reconstructions = [], [], [], [], []
    for images, _ in tqdm(DataLoader(dataset, batch_size=args.batch_size), desc="reconstructing", unit="batch"):
        images = images.to(device)
        reconstructed = model(images, inject_noise=False).sample.float().clamp(-1, 1)
        original01, reconstructed01 = (images + 1) / 2, (reconstructed + 1) / 2
        psnr_values.append(psnr(reconstructed01, original01).cpu())
        ssim_values.append(ssim(reconstructed01, original01).cpu())
        if lpips is not None:
            lpips_values.append(lpips(reconstructed, images, reduction="none").flatten().cpu())
        originals.append(images_to_uint8(original01))
        reconstructions.append(images_to_uint8(reconstructed01))
    originals, reconstructions = np.concatenate(originals), np.concatenate(reconstructions)

    metrics = {"psnr": torch.cat(psnr_values).mean().item(), "ssim": torch.cat(ssim_values).mean().item()}
    if lpips is not None:
        metrics["lpips"] = torch.cat(lpips_values).mean().item()
    if not args.no_rfid:
        fidelity = compute_generation_metrics(reconstructions, originals, fid=True, isc=False, prc=False,
                                              feature_extractor_weights_path=args.inception_weights,
                                              batch_size=args.batch_size, verbose=False)
        metrics["rfid"] = fidelity["fid"]

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    count = min(args.num_visualize, len(originals))
    pairs = torch.from_numpy(np.stack([originals[:count], reconstructions[:count]])).permute(0, 1, 4, 2, 3)
    save_image_grid(pairs.flatten(0, 1).float() / 255, str(out_dir / "reconstructions.png"), nrow=count,
                    value_range=(0.0, 1.0))
    results = {
        "metrics": metrics,
        "settings": {
            "autoencoder": os.path.abspath(args.autoencoder), "data_dir": os.path.abspath(args.data_dir),
            "num_images": len(originals), "image_size": model.config.image_size,
            "inception_weights": os.path.abspath(args.inception_weights) if args.inception_weights else None,
            "lpips_vgg_weights": os.path.abspath(args.lpips_vgg_weights) if args.lpips_vgg_weights else None,
            "quantized_to_uint8": True, "device": str(device),
        },
    }
    (out_dir / "reconstruction_metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    print(" | ".join(f"{name} {value:.4f}" for name, value in metrics.items()) + f" ({len(originals)} images)")
    return results


if __name__ == "__main__":
    main(parse_args())
