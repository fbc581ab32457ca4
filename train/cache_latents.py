"""Shim: runs uae_gen/scripts/cache_latents.py (also `python -m uae_gen.scripts.cache_latents`)."""
from uae_gen.scripts.cache_latents import main, parse_args

if __name__ == "__main__":
    main(parse_args())
