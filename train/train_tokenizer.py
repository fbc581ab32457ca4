"""Shim: runs uae_gen/scripts/train_tokenizer.py (also `python -m uae_gen.scripts.train_tokenizer`)."""
from uae_gen.scripts.train_tokenizer import main, parse_args

if __name__ == "__main__":
    main(parse_args())
