"""Read a state dict from a local weights file: safetensors, or a torch file loaded with weights_only=True."""

import os

import torch
from safetensors.torch import load_file


def read_state_dict(path: str, what: str) -> dict[str, torch.Tensor]:
    """Load the tensors of a local weights file; `what` names the weights in error messages."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: weights file {path!r} does not exist")
    if path.endswith(".safetensors"):
        return load_file(path, device="cpu")
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise ValueError(f"{what}: {path!r} does not hold a flat state dict (name -> tensor)")
    return state_dict
