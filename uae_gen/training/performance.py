"""The speed flags of the scripts (torch.compile, attention backend) and their start-up checks.

Every check here runs before a model is built or a sample is read, so a flag the machine cannot honour ends the run
with one clear error instead of a crash (or a silent fallback) minutes later:
- ``--attention_backend xformers`` without the xformers package, or on a run that is not on CUDA;
- ``--mixed_precision fp16`` on the CPU (accelerate would quietly run fp32 there: no autocast, no GradScaler);
- an unknown ``--compile_mode`` (argparse's choices).
"""

import argparse
import os
from typing import Optional

import torch
from accelerate.utils import parse_flag_from_env
from torch import nn

from uae_gen.models.attention import ATTENTION_BACKENDS, check_attention_backend_available

# torch.compile's modes: "reduce-overhead" adds CUDA graphs, "max-autotune" searches kernel configurations.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def add_compile_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """``--compile`` and ``--compile_mode`` (``what`` names the compiled module in the help)."""
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help=f"torch.compile the {what} with fullgraph=True (a graph break is an error)")
    parser.add_argument("--compile_mode", choices=COMPILE_MODES, default="default", help="torch.compile mode")


def add_attention_backend_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--attention_backend", choices=ATTENTION_BACKENDS, default=None,
                        help="UAEDiT attention: sdpa, xformers (CUDA, optional package) or auto (xformers on CUDA "
                        "when installed, else SDPA); default: the model's config (sdpa)")


def run_device_type(use_cpu: bool = False) -> str:
    """The device type an Accelerator / PartialState of this process will pick: "cpu" when asked (``use_cpu`` or
    ACCELERATE_USE_CPU, as ``accelerate launch --cpu`` sets it) or when no accelerator is present."""
    if use_cpu or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.accelerator.is_available():
        return "cpu"
    return torch.accelerator.current_accelerator().type


def check_device_arguments(args: argparse.Namespace, device_type: Optional[str] = None,
                           mixed_precision: Optional[str] = None) -> None:
    """Refuse speed / precision flags the run's device cannot honour (see the module docstring). ``device_type``
    and ``mixed_precision`` default to what accelerate will choose: `run_device_type()` and --mixed_precision, or
    accelerate launch's ACCELERATE_MIXED_PRECISION when the flag is not given."""
    device_type = device_type or run_device_type()
    if mixed_precision is None:
        mixed_precision = getattr(args, "mixed_precision", None) or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if mixed_precision == "fp16" and device_type == "cpu":
        raise ValueError("--mixed_precision fp16 needs a GPU: on the CPU accelerate would silently train in fp32 "
                         "(no autocast, no GradScaler); use --mixed_precision bf16 or no")
    backend = getattr(args, "attention_backend", None)
    if backend is not None:
        check_attention_backend_available(backend, device_type)


def compile_module(module: nn.Module, mode: str = "default") -> nn.Module:
    """torch.compile ``module`` in place (``nn.Module.compile``): the same object, so accelerate's unwrap_model,
    the checkpoint hooks, state_dict keys and from_pretrained folders see the plain model. fullgraph=True: the
    models compile without graph breaks (tests/test_compile.py), so one would be a regression, raised at the first
    step instead of a silent slowdown."""
    module.compile(fullgraph=True, mode=mode)
    return module
