"""One attention entry point for every transformer in uae_gen.

`attention(q, k, v, backend)` takes q, k, v shaped (B, heads, N, head_dim) and returns the same layout.
Backends: "sdpa" (torch's scaled_dot_product_attention, the default, runs everywhere), "xformers"
(memory_efficient_attention; an optional extra with CUDA-only kernels) and "auto" (xformers when it is
installed and the tensors are on CUDA, else SDPA). xformers is imported lazily, only when asked for.
"""

import importlib.util
from functools import cache
from typing import Optional, Union

import torch
import torch.nn.functional as F

ATTENTION_BACKENDS = ("sdpa", "xformers", "auto")
_XFORMERS_MISSING = ("attention backend 'xformers' needs the optional xformers package "
                     "(pip install 'uae_gen[xformers]'); use backend='sdpa' or 'auto' without it.")


@cache
def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def check_attention_backend(backend: str) -> None:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"Unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}.")


def check_attention_backend_available(backend: str, device: Optional[Union[str, torch.device]] = None) -> None:
    """Fail early, with one clear message, for a backend this machine cannot run: an unknown name, "xformers" without
    the xformers package, or "xformers" for a run on a device other than CUDA (when `device` is given)."""
    check_attention_backend(backend)
    if backend != "xformers":
        return
    if not xformers_available():
        raise ImportError(_XFORMERS_MISSING)
    if device is not None and torch.device(device).type != "cuda":
        raise ValueError(f"attention backend 'xformers' has CUDA-only kernels but the run is on {torch.device(device)}; "
                         "use 'sdpa' or 'auto'.")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v for (B, heads, N, head_dim) inputs, no mask, no dropout."""
    check_attention_backend(backend)
    if backend == "auto":
        backend = "xformers" if q.is_cuda and xformers_available() else "sdpa"
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    try:
        import xformers.ops
    except ImportError as error:
        raise ImportError(_XFORMERS_MISSING) from error
    if not q.is_cuda:
        raise ValueError(
            f"attention backend 'xformers' has CUDA-only kernels but the tensors are on {q.device}; "
            "use backend='sdpa' or 'auto'."
        )
    # xformers wants (B, N, heads, head_dim).
    out = xformers.ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
