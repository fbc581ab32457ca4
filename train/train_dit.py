"""Shim: runs uae_gen/scripts/train_dit.py (also `python -m uae_gen.scripts.train_dit`)."""
from uae_gen.scripts.train_dit import main, parse_args

if __name__ == "__main__":
    main(parse_args())
