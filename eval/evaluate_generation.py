"""Score generated samples: FID, Inception Score, precision/recall (and KID) with torch-fidelity's Inception.

    python eval/evaluate_generation.py --generated samples.npz --reference VIRTUAL_imagenet256_labeled.npz \
        --inception_weights weights-inception-2015-12-05-6726825d.pth --out results.json

`--generated` and `--reference` are image folders or ADM npz files (arr_0 uint8 N,H,W,3). A reference npz with
`mu`/`sigma` (ADM reference batch) gives FID against those full-data-set statistics; its images serve
precision/recall, as in the ADM evaluator. Precision/recall use Inception pool_3 features, k = 3 (ADM), not
torch-fidelity's VGG16 default. These are fast in-repo estimates: paper numbers come from ADM's TF evaluator on
the same npz. The JSON holds every number and the settings that produced it.
"""

import argparse
import json
import os
import platform
from pathlib import Path

import torch
import torch_fidelity

from uae_gen.metrics import compute_generation_metrics, feature_layers_for_metrics


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generated", required=True, help="Generated images: folder of png/jpg or ADM .npz.")
    parser.add_argument("--reference", default=None,
                        help="Real images: folder, .npz, or ADM reference .npz with mu/sigma. Needed for fid/prc/kid.")
    parser.add_argument("--inception_weights", default=None,
                        help="Local torch-fidelity Inception weights (.pth) for offline use; default: download.")
    parser.add_argument("--feature_extractor", default="inception-v3-compat",
                        help="torch-fidelity feature extractor name (must be registered).")
    parser.add_argument("--metrics", nargs="+", default=["fid", "isc", "prc"], choices=["fid", "isc", "prc", "kid"])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--isc_splits", type=int, default=10)
    parser.add_argument("--prc_neighborhood", type=int, default=3)
    parser.add_argument("--kid_subsets", type=int, default=100)
    parser.add_argument("--kid_subset_size", type=int, default=1000)
    parser.add_argument("--out", default="results.json", help="JSON file to write.")
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    return parser.parse_args(argv)


def summary_line(metrics: dict) -> str:
    parts = []
    if "fid" in metrics:
        parts.append(f"FID {metrics['fid']:.4f}")
    if "inception_score" in metrics:
        parts.append(f"IS {metrics['inception_score']:.3f} ± {metrics['inception_score_std']:.3f}")
    if "precision" in metrics:
        parts.append(f"precision {metrics['precision']:.4f} recall {metrics['recall']:.4f}")
    if "kid" in metrics:
        parts.append(f"KID {metrics['kid']:.6f} ± {metrics['kid_std']:.6f}")
    counts = f"({metrics['num_generated']} generated, {metrics['num_reference']} reference images)"
    return " | ".join(parts) + " " + counts


def main(args: argparse.Namespace) -> dict:
    wanted = set(args.metrics)
    metrics = compute_generation_metrics(
        args.generated, args.reference, fid="fid" in wanted, isc="isc" in wanted, prc="prc" in wanted,
        kid="kid" in wanted, feature_extractor=args.feature_extractor,
        feature_extractor_weights_path=args.inception_weights, batch_size=args.batch_size,
        isc_splits=args.isc_splits, prc_neighborhood=args.prc_neighborhood, kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size, verbose=not args.quiet,
    )
    settings = {
        "generated": os.path.abspath(args.generated),
        "reference": os.path.abspath(args.reference) if args.reference else None,
        "num_generated": metrics["num_generated"],
        "num_reference": metrics["num_reference"],
        "fid_reference": ("precomputed mu/sigma of the reference npz" if metrics["fid_from_reference_stats"]
                          else "features of the reference images") if "fid" in wanted else None,
        "metrics": sorted(wanted),
        "feature_extractor": args.feature_extractor,
        "feature_layers": feature_layers_for_metrics(sorted(wanted), args.feature_extractor),
        "feature_extractor_weights": os.path.abspath(args.inception_weights) if args.inception_weights else None,
        "batch_size": args.batch_size,
        "isc_splits": args.isc_splits,
        "prc_neighborhood": args.prc_neighborhood,
        "kid_subsets": args.kid_subsets if "kid" in wanted else None,
        "kid_subset_size": args.kid_subset_size if "kid" in wanted else None,
        "torch_fidelity_version": torch_fidelity.__version__,
        "torch_version": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
    }
    results = {"metrics": metrics, "settings": settings}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(summary_line(metrics))
    return results


if __name__ == "__main__":
    main(parse_args())
