"""Prism spectrum: where in frequency each encoder's feature grid keeps its energy (the paper's preliminary
analysis), and what each band of a UAE latent decodes to.

    python eval/prism_spectrum.py --autoencoder UAE_DIR --encoder timm/vit_base_patch14_reg4_dinov2.lvd142m \
        --pixels --data_dir imagenet/val --max_images 1000 --out_dir prism_spectrum
    python eval/prism_spectrum.py --encoder timm/vit_base_patch14_dinov2.lvd142m --pixels --dataset demo-digits

Feature grids compared (one curve each):
  --autoencoder  the UAE's raw latent (`encode_raw`, eval mode: no noise);
  --encoder      a semantic encoder: timm hub name or local weights file (repeatable). Its architecture is
                 --encoder_model, else the hub name's, else the autoencoder's encoder; kwargs, input size and token
                 norm default to the autoencoder's encoder when the architecture is the same (so --encoder can be
                 the weights the UAE started from);
  --pixels       the image itself, average-pooled to the first grid's size (a pixel "encoder").
For every grid: the radial power spectrum averaged over images and channels (`uae_gen.metrics.SpectrumAccumulator`,
Nyquist = 1), the energy share inside --cutoff_radius, and the energy share of every band of the band split
(the autoencoder's own split, else --num_bands smooth FFT bands), band 0 first (`band_energy_shares`).

Writes out_dir/spectrum.png (relative power per frequency, log scale, and cumulative energy share),
out_dir/band_decodes.png with --autoencoder (rows: band 0, bands 0-1, ..., all K bands decoded, then the input),
and out_dir/prism_spectrum.json (binned spectra, band shares, band-0 share, settings).
"""

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from uae_gen import AutoencoderUAE
from uae_gen.data import ImageFolderDataset, load_demo_digits
from uae_gen.metrics import RadialSpectrum, SpectrumAccumulator, band_energies
from uae_gen.models.bands import BandProjector, default_cutoffs
from uae_gen.models.encoders import TOKEN_NORMS, SemanticEncoder, load_encoder_weights
from uae_gen.training import save_image_grid, write_json

NON_RADIAL_CUTOFF = 0.25  # --cutoff_radius when the band split is not radial (DCT, one band): the 4-band cut-off


def json_object(text: str) -> dict:
    """argparse type of --encoder_kwargs: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"depth\": 2}}', got {text!r}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--autoencoder", default=None, help="AutoencoderUAE directory (from_pretrained).")
    parser.add_argument("--encoder", action="append", default=[],
                        help="Encoder weights: timm hub name or local file. Repeat to compare several.")
    parser.add_argument("--encoder_model", default=None, help="timm architecture of the --encoder weights.")
    parser.add_argument("--encoder_kwargs", type=json_object, default=None,
                        help='timm kwargs of that architecture as JSON, e.g. \'{"depth": 2, "embed_dim": 64}\'.')
    parser.add_argument("--encoder_input_size", type=int, default=None, help="Encoder input resolution.")
    parser.add_argument("--encoder_token_norm", choices=TOKEN_NORMS, default=None)
    parser.add_argument("--pixels", action="store_true", help="Add the pixels, pooled to the first grid's size.")
    parser.add_argument("--dataset", choices=["demo-digits"], default=None,
                        help="Built-in offline set (its held-out split).")
    parser.add_argument("--data_dir", default=None, help="ImageFolder root (root/<class>/*.jpg).")
    parser.add_argument("--image_size", type=int, default=None,
                        help="Centre-crop size of the images; default the autoencoder's image_size, else 256.")
    parser.add_argument("--max_images", type=int, default=None, help="Use the first N images.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_bins", type=int, default=16, help="Radial bins over [0, sqrt(2)] x Nyquist.")
    parser.add_argument("--num_bands", type=int, default=None,
                        help="Bands of the split without --autoencoder (default 4; with it, its own split).")
    parser.add_argument("--band_cutoffs", type=float, nargs="+", default=None,
                        help="K-1 cut-offs (fractions of Nyquist) of that split; default evenly spaced.")
    parser.add_argument("--cutoff_radius", type=float, default=None,
                        help="Report the energy share below this radius (Nyquist = 1); default band 0's cut-off.")
    parser.add_argument("--num_visualize", type=int, default=4, help="Images in band_decodes.png.")
    parser.add_argument("--out_dir", default="prism_spectrum")
    args = parser.parse_args(argv)
    if args.autoencoder is None and not args.encoder:
        parser.error("give --autoencoder UAE_DIR and/or --encoder WEIGHTS: there is no feature grid to analyse")
    if (args.dataset is None) == (args.data_dir is None):
        parser.error("give either --dataset or --data_dir")
    if args.autoencoder is not None and (args.num_bands is not None or args.band_cutoffs is not None):
        parser.error("--num_bands / --band_cutoffs set the split without --autoencoder; the UAE brings its own")
    return args


@dataclass
class FeatureSource:
    """One curve: a way to turn images into a feature grid, and the running sums measured on its grids."""

    name: str
    kind: str  # "autoencoder", "encoder" or "pixels"
    origin: str  # directory, weights file or hub name the grid comes from
    extract: Callable[[torch.Tensor], torch.Tensor]
    grid_size: tuple[int, int]
    spectrum: SpectrumAccumulator = field(default_factory=SpectrumAccumulator)
    band_energy: Optional[torch.Tensor] = None  # (K,) sums of <b_k, z>
    total_energy: float = 0.0  # sum of z^2
    channels: int = 0
    architecture: Optional[dict] = None  # how an encoder was built


def architecture_from_hub_name(source: str) -> str:
    """"timm/vit_base_patch14_dinov2.lvd142m" -> "vit_base_patch14_dinov2"."""
    return source.removeprefix("timm/").split(".")[0]


def build_encoder(args: argparse.Namespace, source: str, model: Optional[AutoencoderUAE]) -> SemanticEncoder:
    uae = model.config if model is not None else None
    if args.encoder_model is not None:
        architecture = args.encoder_model
    elif not os.path.isfile(source):
        architecture = architecture_from_hub_name(source)
    elif uae is not None:
        architecture = uae.encoder_name
    else:
        raise ValueError(f"--encoder {source!r} is a weights file: give its timm architecture with --encoder_model")
    same = uae is not None and architecture == uae.encoder_name  # inherit the UAE encoder's settings
    kwargs = args.encoder_kwargs if args.encoder_kwargs is not None else (uae.encoder_kwargs if same else None)
    input_size = args.encoder_input_size or (uae.encoder_input_size if same else 224)
    token_norm = args.encoder_token_norm or (uae.encoder_token_norm if same else "layernorm_no_affine")
    encoder = SemanticEncoder(architecture, input_size, token_norm, kwargs)
    return load_encoder_weights(encoder, source).eval()


def unique_name(name: str, taken: list[str]) -> str:
    candidate, number = name, 2
    while candidate in taken:
        candidate, number = f"{name} ({number})", number + 1
    return candidate


def build_sources(args, model: Optional[AutoencoderUAE], device) -> list[FeatureSource]:
    sources = []
    if model is not None:
        sources.append(FeatureSource("uae latent", "autoencoder", os.path.abspath(args.autoencoder), model.encode_raw,
                                     tuple(model.latent_size)))
    for source in args.encoder:
        encoder = build_encoder(args, source, model).to(device)
        name = Path(source).stem if os.path.isfile(source) else source
        origin = os.path.abspath(source) if os.path.isfile(source) else source
        architecture = dict(model_name=encoder.model_name, model_kwargs=encoder.model_kwargs,
                            input_size=encoder.input_size, token_norm=encoder.token_norm)
        sources.append(FeatureSource(unique_name(name, [s.name for s in sources]), "encoder", origin, encoder,
                                     tuple(encoder.grid_size), architecture=architecture))
    if args.pixels:
        grid = sources[0].grid_size
        sources.append(FeatureSource("pixels", "pixels", f"images average-pooled to {grid[0]}x{grid[1]}",
                                     lambda images: F.adaptive_avg_pool2d(images, grid), grid))
    return sources


def band_split_settings(args, model: Optional[AutoencoderUAE]) -> dict:
    """The band split every grid is measured with: the autoencoder's own, else --num_bands smooth FFT bands."""
    if model is not None:
        c = model.config
        return dict(num_bands=c.num_bands, transform=c.band_transform, cutoffs=c.band_cutoffs,
                    mask_shape=c.band_mask_shape, transition_width=c.band_transition_width,
                    keep_residual=c.band_keep_residual)
    return dict(num_bands=args.num_bands or 4, transform="fft", cutoffs=args.band_cutoffs)


def load_images(args, image_size: int):
    if args.dataset == "demo-digits":
        dataset = load_demo_digits("heldout", image_size)
    else:
        dataset = ImageFolderDataset(args.data_dir, image_size)
    if args.max_images is not None:
        dataset = Subset(dataset, range(min(args.max_images, len(dataset))))
    return dataset


@torch.no_grad()
def cumulative_band_decodes(model: AutoencoderUAE, images: torch.Tensor) -> torch.Tensor:
    """(K, B, 3, H, W): image k decodes bands 0..k of the latent (the higher bands zeroed before the merge)."""
    bands = model.split_bands(model.encode_raw(images))
    num_bands = bands.shape[1]
    decodes = []
    for k in range(num_bands):
        keep = (torch.arange(num_bands, device=bands.device) <= k).to(bands.dtype).view(1, num_bands, 1, 1, 1)
        decodes.append(model.decode_raw(model.merge_bands(bands * keep))[0])
    return torch.stack(decodes)


def save_band_decodes(model: AutoencoderUAE, images: torch.Tensor, path: str) -> None:
    decodes = cumulative_band_decodes(model, images)
    num_bands, count = decodes.shape[:2]
    rows = ["band 0" if k == 0 else f"bands 0-{k}" for k in range(num_bands)] + ["input"]
    tiles = torch.cat([decodes.flatten(0, 1), images]).float().clamp(-1, 1)
    save_image_grid(tiles, path, nrow=count, labels=[row for row in rows for _ in range(count)])


# ---- the spectrum figure, drawn with PIL (no plotting dependency) ---------------------------------------------
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (23, 190, 207)]
PANEL_SIZE = (460, 320)  # plot area of each panel, pixels
MARGIN = dict(left=72, right=24, top=36, bottom=48)
LEGEND_ROW = 20


class PlotPanel:
    """One pair of axes: maps data (x, y) to pixels, y linear or log10."""

    def __init__(self, draw, origin, x_range, y_range, log_y, font):
        self.draw, self.font, self.log_y = draw, font, log_y
        self.left, self.top = origin
        self.right, self.bottom = self.left + PANEL_SIZE[0], self.top + PANEL_SIZE[1]
        self.x_range, self.y_range = x_range, y_range

    def to_pixels(self, x: float, y: float) -> tuple[float, float]:
        y = math.log10(y) if self.log_y else y
        fx = (x - self.x_range[0]) / (self.x_range[1] - self.x_range[0])
        fy = (y - self.y_range[0]) / (self.y_range[1] - self.y_range[0])
        return self.left + fx * PANEL_SIZE[0], self.bottom - fy * PANEL_SIZE[1]

    def axes(self, title: str, x_label: str, x_ticks, y_ticks, y_tick_text) -> None:
        draw, font, grey = self.draw, self.font, (225, 225, 225)
        for x in x_ticks:
            px, _ = self.to_pixels(x, y_ticks[0])
            draw.line([(px, self.top), (px, self.bottom)], fill=grey)
            draw.text((px, self.bottom + 6), f"{x:g}", fill="black", font=font, anchor="ma")
        for y in y_ticks:
            _, py = self.to_pixels(x_ticks[0], y)
            draw.line([(self.left, py), (self.right, py)], fill=grey)
            draw.text((self.left - 6, py), y_tick_text(y), fill="black", font=font, anchor="rm")
        draw.rectangle([self.left, self.top, self.right, self.bottom], outline="black")
        draw.text(((self.left + self.right) / 2, self.top - 10), title, fill="black", font=font, anchor="md")
        draw.text(((self.left + self.right) / 2, self.bottom + 26), x_label, fill="black", font=font, anchor="ma")

    def curve(self, xs, ys, colour) -> None:
        points = [self.to_pixels(x, y) for x, y in zip(xs, ys)]
        if len(points) > 1:
            self.draw.line(points, fill=colour, width=2)
        for px, py in points:
            self.draw.ellipse([px - 2.5, py - 2.5, px + 2.5, py + 2.5], fill=colour)

    def vertical_marker(self, x: float, label: str) -> None:
        px, _ = self.to_pixels(x, 10 ** self.y_range[0] if self.log_y else self.y_range[0])
        for y in range(int(self.top), int(self.bottom), 8):  # dashed
            self.draw.line([(px, y), (px, min(y + 4, self.bottom))], fill=(90, 90, 90))
        self.draw.text((px + 4, self.top + 4), label, fill=(90, 90, 90), font=self.font)


def draw_spectrum_figure(spectra: dict[str, RadialSpectrum], band0_shares: dict[str, float], cutoff_radius: float,
                         path: str) -> None:
    """Left: relative power per frequency (power / total energy, log scale) against radial frequency; right: the
    cumulative energy share. One colour per feature grid; the legend gives each grid's band-0 energy share."""
    font = ImageFont.load_default(size=13)
    panel_width = MARGIN["left"] + PANEL_SIZE[0] + MARGIN["right"]
    height = MARGIN["top"] + PANEL_SIZE[1] + MARGIN["bottom"] + LEGEND_ROW * len(spectra) + 8
    canvas = Image.new("RGB", (2 * panel_width, height), "white")
    draw = ImageDraw.Draw(canvas)

    relative = {name: [(x, p / s.total_energy) for x, p, n in
                       zip(s.bin_centers.tolist(), s.power.tolist(), s.frequency_count.tolist()) if n > 0 and p > 0]
                for name, s in spectra.items()}
    values = [y for points in relative.values() for _, y in points] or [1.0]
    decades = (math.floor(math.log10(min(values))), math.ceil(math.log10(max(values))))
    decades = (decades[0], max(decades[1], decades[0] + 1))
    x_range, x_ticks = (0.0, math.sqrt(2.0)), [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]
    x_label = "radial frequency (Nyquist = 1)"

    power = PlotPanel(draw, (MARGIN["left"], MARGIN["top"]), x_range, decades, True, font)
    power.axes("relative power per frequency (log)", x_label, x_ticks,
               [10.0 ** d for d in range(decades[0], decades[1] + 1)], lambda y: f"1e{round(math.log10(y))}")
    cumulative = PlotPanel(draw, (panel_width + MARGIN["left"], MARGIN["top"]), x_range, (0.0, 1.0), False, font)
    cumulative.axes("cumulative energy share", x_label, x_ticks, [0.0, 0.25, 0.5, 0.75, 1.0], lambda y: f"{y:g}")
    for panel in (power, cumulative):
        panel.vertical_marker(cutoff_radius, f"cut-off {cutoff_radius:g}")

    legend_top = MARGIN["top"] + PANEL_SIZE[1] + MARGIN["bottom"]
    for index, (name, spectrum) in enumerate(spectra.items()):
        colour = PALETTE[index % len(PALETTE)]
        if relative[name]:
            power.curve(*zip(*relative[name]), colour)
        edges = spectrum.bin_edges.tolist()
        cumulative.curve(edges, [0.0, *spectrum.cumulative_share.tolist()], colour)
        y = legend_top + index * LEGEND_ROW
        draw.line([(MARGIN["left"], y + 8), (MARGIN["left"] + 28, y + 8)], fill=colour, width=3)
        draw.text((MARGIN["left"] + 36, y), f"{name}: band-0 energy share {band0_shares[name]:.3f}", fill="black",
                  font=font)
    canvas.save(path)


@torch.no_grad()
def main(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoencoderUAE.from_pretrained(args.autoencoder).to(device).eval() if args.autoencoder else None
    image_size = args.image_size or (model.config.image_size if model is not None else 256)
    dataset = load_images(args, image_size)
    sources = build_sources(args, model, device)

    split = band_split_settings(args, model)
    projectors = {tuple(model.latent_size): model.band_projector} if model is not None else {}
    for source in sources:  # grids of another size get the same split, built for their size
        if source.grid_size not in projectors:
            projectors[source.grid_size] = BandProjector(*source.grid_size, **split).to(device)
    cutoffs = split["cutoffs"] or default_cutoffs(split["num_bands"])
    radial = split["transform"] == "fft" and split["num_bands"] > 1
    cutoff_radius = args.cutoff_radius
    if cutoff_radius is None:
        cutoff_radius = cutoffs[0] if radial else NON_RADIAL_CUTOFF

    for images, _ in tqdm(DataLoader(dataset, batch_size=args.batch_size), desc="spectra", unit="batch"):
        images = images.to(device)
        for source in sources:
            grid = source.extract(images).float()
            source.spectrum.update(grid)
            energies = band_energies(grid, projectors[source.grid_size].split(grid))
            source.band_energy = energies if source.band_energy is None else source.band_energy + energies
            source.total_energy += grid.double().square().sum().item()
            source.channels = grid.shape[1]

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spectra = {source.name: source.spectrum.compute(args.num_bins) for source in sources}
    results = {"sources": {}, "band0_energy_share": {}}
    for source in sources:
        shares = (source.band_energy / source.total_energy).tolist()
        results["band0_energy_share"][source.name] = shares[0]
        results["sources"][source.name] = {
            "kind": source.kind, "origin": source.origin, "grid": [source.channels, *source.grid_size],
            "band_energy_shares": shares, "band0_energy_share": shares[0],
            "energy_share_within_cutoff": spectra[source.name].energy_share_within(cutoff_radius),
            "spectrum": spectra[source.name].to_dict(),
        }
    draw_spectrum_figure(spectra, results["band0_energy_share"], cutoff_radius, str(out_dir / "spectrum.png"))
    if model is not None and args.num_visualize > 0:
        count = min(args.num_visualize, len(dataset))
        images = torch.stack([dataset[i][0] for i in range(count)]).to(device)
        save_band_decodes(model, images, str(out_dir / "band_decodes.png"))
    results["settings"] = {
        "autoencoder": os.path.abspath(args.autoencoder) if args.autoencoder else None,
        "encoders": {s.name: {"origin": s.origin, **s.architecture} for s in sources if s.kind == "encoder"},
        "pixels": args.pixels, "data": args.dataset or os.path.abspath(args.data_dir), "num_images": len(dataset),
        "image_size": image_size, "num_bins": args.num_bins, "cutoff_radius": cutoff_radius,
        "band_split": {**split, "cutoffs": list(cutoffs)}, "device": str(device),
    }
    write_json(str(out_dir / "prism_spectrum.json"), results)
    for name, source in results["sources"].items():
        print(f"{name}: band-0 energy share {source['band0_energy_share']:.4f}, energy within r <= "
              f"{cutoff_radius:g} {source['energy_share_within_cutoff']:.4f}, DC {source['spectrum']['dc_share']:.4f}")
    return results


if __name__ == "__main__":
    main(parse_args())
