"""Test-wide settings: never reach a model hub (the variable must be set before huggingface_hub is imported)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
