"""End-to-end, offline: eval/evaluate_generation.py with torch-fidelity's InceptionV3 carrying random weights
saved to a local file (the real weights cannot be downloaded here), on a few tiny images. The script runs as
`python eval/evaluate_generation.py ...` runs it (as __main__, with its command line), in this process: a
subprocess only added ~8 s of imports."""

import importlib.util
import json
import runpy
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as inception_module
from PIL import Image

from uae_gen.metrics import (
    extract_features,
    frechet_distance_from_features,
    inception_score,
    precision_recall,
    save_samples_npz,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "eval" / "evaluate_generation.py"
NUM_IMAGES = 5  # InceptionV3 at 299 px runs ~3 images/s on a 2-core CPU; P/R (k=3) needs > 3


def save_random_inception_weights(path, seed: int = 0) -> Path:
    """Write a state dict for torch-fidelity's `inception-v3-compat` extractor with random weights.

    The extractor's constructor always loads weights (a download when no path is given), so it is built with
    the loading patched out, then given a variance-preserving init (PyTorch's default init shrinks activations
    layer by layer until every image has the same features) and logits large enough for IS to differ from 1.
    Pass the file as `feature_extractor_weights_path` / `--inception_weights`.
    """
    torch.manual_seed(seed)
    with mock.patch.object(inception_module, "load_state_dict_from_url", return_value=None), \
            mock.patch.object(inception_module.FeatureExtractorInceptionV3, "load_state_dict"):
        model = inception_module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.nn.init.normal_(model.fc.weight, std=1.0)
    torch.save(model.state_dict(), path)
    return Path(path)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    return save_random_inception_weights(tmp_path_factory.mktemp("inception") / "random_inception.pth")


def random_images(n, seed, brightness):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(n, 4, 4, 3)).repeat(8, axis=1).repeat(8, axis=2)  # blocky 32x32
    return (base * brightness).astype(np.uint8)


def load_script():
    spec = importlib.util.spec_from_file_location("evaluate_generation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_lists_the_options(capsys):
    script = load_script()
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--generated", "--reference", "--inception_weights", "--metrics", "--batch_size", "--out"):
        assert option in help_text


def test_script_offline_matches_in_process_features(inception_weights, tmp_path, monkeypatch, capsys):
    generated_folder = tmp_path / "generated"
    generated_folder.mkdir()
    for i, image in enumerate(random_images(NUM_IMAGES, seed=0, brightness=0.6)):
        Image.fromarray(image).save(generated_folder / f"{i:06d}.png")
    reference_npz = save_samples_npz(tmp_path / "reference.npz", random_images(NUM_IMAGES, seed=1, brightness=1.0))
    out = tmp_path / "results" / "metrics.json"

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", [
        str(SCRIPT), "--generated", str(generated_folder), "--reference", str(reference_npz),
        "--inception_weights", str(inception_weights), "--metrics", "fid", "isc", "prc", "--isc_splits", "2",
        "--batch_size", "5", "--out", str(out)])
    runpy.run_path(str(SCRIPT), run_name="__main__")  # the script's `if __name__ == "__main__"` path
    printed = capsys.readouterr().out
    assert "FID" in printed and "precision" in printed
    results = json.loads(out.read_text())
    metrics, settings = results["metrics"], results["settings"]
    for key in ("fid", "inception_score", "inception_score_std", "precision", "recall"):
        assert np.isfinite(metrics[key]), key
    assert metrics["fid"] > 0 and metrics["inception_score"] > 1.0
    assert 0.0 <= metrics["precision"] <= 1.0 and 0.0 <= metrics["recall"] <= 1.0
    assert settings["num_generated"] == NUM_IMAGES and settings["num_reference"] == NUM_IMAGES
    assert settings["feature_extractor"] == "inception-v3-compat"
    assert settings["feature_layers"] == {"fid": "2048", "isc": "logits_unbiased", "prc": "2048"}
    assert settings["torch_fidelity_version"] == torch_fidelity.__version__
    assert settings["feature_extractor_weights"] == str(inception_weights)

    # The same numbers from features extracted in this process (PNG is lossless: same pixels as the arrays).
    generated = extract_features(generated_folder, ["2048", "logits_unbiased"],
                                 feature_extractor_weights_path=inception_weights, batch_size=5, verbose=False)
    reference = extract_features(reference_npz, ["2048"], feature_extractor_weights_path=inception_weights,
                                 batch_size=5, verbose=False)
    assert generated["2048"].shape == (NUM_IMAGES, 2048)
    assert metrics["fid"] == pytest.approx(frechet_distance_from_features(generated["2048"], reference["2048"]),
                                           rel=1e-5)
    assert metrics["inception_score"] == pytest.approx(inception_score(generated["logits_unbiased"], splits=2)[0],
                                                       rel=1e-5)
    assert (metrics["precision"], metrics["recall"]) == precision_recall(generated["2048"], reference["2048"])
