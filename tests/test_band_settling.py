"""eval/band_settling.py: the predicted clean latents it reads off Euler steps, the band distances, its files."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from uae_gen import AutoencoderUAE, FlowMatchBandScheduler, UAEDiT, UAEDiTPipeline

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("band_settling", REPO / "eval" / "band_settling.py")
band_settling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(band_settling)


def tiny_pipeline(band_stagger=0.0, solver="rk4"):
    torch.manual_seed(0)
    transformer = UAEDiT.from_preset("DiT-tiny", in_channels=64, sample_size=8, num_classes=10).eval()
    with torch.no_grad():  # adaLN-Zero starts at zero velocity
        for p in transformer.parameters():
            p.add_(0.02 * torch.randn_like(p))
    scheduler = FlowMatchBandScheduler(latent_dim=64 * 8 * 8, num_bands=4, band_stagger=band_stagger, solver=solver)
    pipe = UAEDiTPipeline(transformer=transformer, vae=AutoencoderUAE.from_preset("tiny").eval(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_predictions_follow_the_euler_steps_and_end_at_the_final_latent():
    pipe = tiny_pipeline()
    result = band_settling.band_settling(pipe, [1, 4], num_inference_steps=5, guidance_scale=2.0, seed=3)
    assert pipe.scheduler.config.solver == "euler"  # the saved rk4 is replaced: the read-off needs Euler steps
    reference = pipe(class_labels=[1, 4], guidance_scale=2.0, num_inference_steps=5, output_type="latent",
                     generator=torch.Generator().manual_seed(3)).images
    assert torch.equal(result["final"], reference)  # the same noise and steps as a plain call
    assert len(result["predictions"]) == 5 and len(result["time_grid"]) == 6
    # The grid ends at t_N = 0.001, so the last prediction is the final latent moved by t_N v.
    t_last = result["time_grid"][-1]
    assert 0 < t_last < 2e-3
    assert (result["predictions"][-1] - result["final"]).abs().max() < 0.01 * result["final"].abs().max()
    first, last = result["band_distances"][0], result["band_distances"][-1]
    assert len(first) == 4 and all(end < start / 10 for start, end in zip(first, last))


def test_staggered_clocks_are_refused():
    with pytest.raises(ValueError, match="staggered"):
        band_settling.band_settling(tiny_pipeline(band_stagger=0.3), [0], 4, 1.0, 0)


def test_cli_writes_the_grid_curves_and_json(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path / "pipe")
    args = band_settling.parse_args(["--pipeline", str(tmp_path / "pipe"), "--class_labels", "2", "5",
                                     "--num_inference_steps", "4", "--num_shown", "3", "--out_dir", str(tmp_path / "o")])
    record = band_settling.main(args)
    assert record == json.loads((tmp_path / "o" / "band_settling.json").read_text())
    assert record["shown_steps"] == [0, 2, 3] and len(record["band_distances"]) == 4
    with Image.open(tmp_path / "o" / "band_settling.png") as grid:
        assert grid.width > 4 * 32  # 3 predictions + the final image per row
    assert (tmp_path / "o" / "band_settling_curves.png").stat().st_size > 0
    with pytest.raises(ValueError, match="--num_shown must lie in"):
        band_settling.parse_args(["--pipeline", "p", "--class_labels", "1", "--num_inference_steps", "2",
                                  "--num_shown", "3"])
