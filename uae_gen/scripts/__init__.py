"""The training scripts as package modules: `python -m uae_gen.scripts.train_dit` or
`accelerate launch -m uae_gen.scripts.train_dit`; train/*.py in a checkout are shims that run them."""
