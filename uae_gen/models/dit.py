"""UAEDiT: the class-conditional latent generator, plain DiT or DiT^DH (DiT with a wide DDT head).

Flow-matching convention (official RAE/UAE code): `timestep` t in [0, 1], t=1 is pure noise, and the model
returns the velocity eps - x with the input's shape. Its last layer predicts that velocity directly
(`prediction_type="velocity"`), or the clean latent x (`"sample"`, JiT's x-prediction), turned into the velocity
(x_t - x) / t. JiT's argument for the second: a clean latent lies near a low-dimensional manifold while a velocity
holds all of the noise, which a network cannot carry through when a token holds more values than its width (as
with several coefficients_per_token).

Coarse to fine (`coarse_tokens`, frequency-token models): while t > `coarse_time` the network runs on the first
`coarse_tokens` tokens only; the coefficients after them are not generated yet and stay noise, scaled along the
flow's marginal standard deviation for a unit-variance coefficient, sqrt(t^2 + (1 - t)^2), so at coarse_time they
join the sequence with the variance they would have (Pyramidal Flow's stage jump and re-noising; in DCT
coordinates the coarse latent is a subset of the fine one, so nothing is resampled). The early, noisy steps then
cost what a model on coarse_tokens tokens costs, in training and in sampling.

Two shapes of one class, chosen by `head_depth`:
- plain DiT (head_depth=0): patch embed (+ fixed 2-D sin-cos pos-embed) -> adaLN-Zero blocks conditioned on
  c = t_emb + y_emb -> final layer.
- DiT^DH (RAE "DiTwDDTHead", head_depth>0): the blocks above form the trunk (conditioned on SiLU(t_emb + y_emb));
  its output s = SiLU(trunk + t_emb) is projected to the head width and becomes a *per-token* condition; the
  head re-embeds the noisy input and runs a few wide blocks plus the final layer modulated by s.
Options of the official LightningDiT blocks (SwiGLU, RMSNorm, 2-D RoPE, QK-norm, no-shift adaLN, Gaussian
Fourier time embedding) are config flags. Sizes live in DIT_PRESETS; build one with `UAEDiT.from_preset`.
"""

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .attention import attention, check_attention_backend, check_attention_backend_available
from .bands import LowFrequencyTokens
from .pos_embed import sincos_pos_embed_2d

PREDICTION_TYPES = ("velocity", "sample")
SAMPLE_PREDICTION_MIN_TIME = 0.05  # x-prediction divides by max(t, 0.05): a finite velocity near t = 0 (JiT)

_NO_HEAD = dict(head_hidden_size=None, head_depth=0, head_num_heads=None)
_DH_HEAD = dict(head_hidden_size=2048, head_depth=2, head_num_heads=16)  # RAE's head for every DiT^DH size
DIT_PRESETS = {
    "DiT-tiny": dict(hidden_size=64, depth=2, num_heads=4, **_NO_HEAD),  # unit tests
    "DiT-mini": dict(hidden_size=192, depth=4, num_heads=4, **_NO_HEAD),  # the CPU demo
    "DiT-S": dict(hidden_size=384, depth=12, num_heads=6, **_NO_HEAD),
    "DiT-B": dict(hidden_size=768, depth=12, num_heads=12, **_NO_HEAD),
    "DiT-L": dict(hidden_size=1024, depth=24, num_heads=16, **_NO_HEAD),
    "DiT-XL": dict(hidden_size=1152, depth=28, num_heads=16, **_NO_HEAD),
    "DiT-DH-tiny": dict(hidden_size=64, depth=2, num_heads=4, head_hidden_size=96, head_depth=1, head_num_heads=4),
    "DiT-DH-S": dict(hidden_size=384, depth=12, num_heads=6, **_DH_HEAD),
    "DiT-DH-B": dict(hidden_size=768, depth=12, num_heads=12, **_DH_HEAD),
    "DiT-DH-L": dict(hidden_size=1024, depth=24, num_heads=16, **_DH_HEAD),
    "DiT-DH-XL": dict(hidden_size=1152, depth=28, num_heads=16, **_DH_HEAD),
}
TIME_EMBEDDING_TYPES = ("gaussian_fourier", "sinusoidal")


def rope_tables_2d(head_dim: int, grid_size: int, theta: float = 1e4) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (grid_size**2, head_dim) of 2-D RoPE as EVA's VisionRotaryEmbeddingFast builds them:
    the first half of each head rotates with the token's row, the second half with its column, and channels
    rotate in adjacent pairs (2k, 2k+1) sharing one angle."""
    half = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, half, 2).float() / half)
    angles = (torch.arange(grid_size).float()[:, None] * freqs).repeat_interleave(2, dim=1)  # (G, half)
    g = grid_size
    per_token = torch.cat([angles[:, None].expand(g, g, half), angles[None, :].expand(g, g, half)], dim=-1)
    per_token = per_token.reshape(g * g, head_dim)
    return per_token.cos(), per_token.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent channel pair (a, b) of x (..., N, head_dim) to (a cos - b sin, b cos + a sin),
    computed as the complex product (a + ib)(cos + i sin) in eager mode. Under torch.compile the same product is
    written in real arithmetic: inductor generates no code for complex operators (it falls back to eager kernels
    and cannot fuse them), while the real form fuses into the surrounding kernels."""
    cos, sin = cos[:, 0::2].float(), sin[:, 0::2].float()  # tables repeat each pair's angle twice
    if torch.compiler.is_compiling():
        a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2).to(x.dtype)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2).to(x.dtype)


def pending_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Velocity of noise x = sigma(t) * eps with sigma(t) = sqrt(t^2 + (1 - t)^2), the flow's standard deviation at t
    for a unit-variance coefficient: x * d(log sigma)/dt."""
    return x * (2 * t - 1) / (t.square() + (1 - t).square())


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) if shift is None else torch.addcmul(shift, x, 1 + scale)


def build_norm(dim: int, use_rmsnorm: bool) -> nn.Module:
    # LightningDiT's RMSNorm keeps a learnable scale; classic DiT uses an affine-free LayerNorm.
    return nn.RMSNorm(dim, eps=1e-6) if use_rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class TimestepEmbedder(nn.Module):
    """Embeds t in [0, 1] into a vector: fixed frequency features -> MLP."""

    def __init__(self, hidden_size: int, embedding_type: str, frequency_size: int = 256):
        super().__init__()
        self.embedding_type = embedding_type
        if embedding_type == "gaussian_fourier":
            # Fixed random frequencies W ~ N(0, 1) (official DiT^DH); a buffer, so saved and loaded with the model.
            self.register_buffer("fourier_freqs", torch.randn(frequency_size))
            frequency_size *= 2
        else:  # classic DiT sinusoid frequencies, rebuilt from the config
            half = frequency_size // 2
            freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
            self.register_buffer("sinusoid_freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        if self.embedding_type == "gaussian_fourier":
            angles = t[:, None] * self.fourier_freqs.float()[None] * 2 * math.pi
            features = torch.cat([angles.sin(), angles.cos()], dim=-1)
        else:
            angles = 1000 * t[:, None] * self.sinusoid_freqs.float()  # DiT's frequencies suit t in [0, 1000)
            features = torch.cat([angles.cos(), angles.sin()], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class BandTimestepEmbedder(nn.Module):
    """One TimestepEmbedder of width hidden/K per band clock, concatenated (Semantic-First Diffusion's per-stream
    time embeddings): t (B, K) -> (B, hidden)."""

    def __init__(self, hidden_size: int, num_times: int, embedding_type: str):
        super().__init__()
        self.embedders = nn.ModuleList(
            TimestepEmbedder(hidden_size // num_times, embedding_type) for _ in range(num_times))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([embed(t[:, k]) for k, embed in enumerate(self.embedders)], dim=-1)


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row, id `num_classes`, for the null label of classifier-free guidance.
    While training, labels are replaced by the null id with probability `dropout_prob`."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            dropped = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = torch.where(dropped, self.num_classes, labels)
        return self.embedding_table(labels)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection, optional QK-norm and 2-D RoPE."""

    def __init__(self, dim: int, num_heads: int, use_qknorm: bool, use_rmsnorm: bool, backend: str):
        super().__init__()
        self.num_heads = num_heads
        self.backend = backend
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        # Official QK-norm: RMSNorm with the RMSNorm option, else a LayerNorm with affine and torch's eps.
        qk_norm = (lambda: nn.RMSNorm(head_dim, eps=1e-6)) if use_rmsnorm else (lambda: nn.LayerNorm(head_dim))
        self.q_norm = qk_norm() if use_qknorm else nn.Identity()
        self.k_norm = qk_norm() if use_qknorm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        # Unbind on the qkv axis itself: its backward then stacks the three gradients straight into qkv's layout
        # (one copy; unbinding a permuted view needs a second to undo the permute).
        q, k, v = (part.transpose(1, 2) for part in qkv.unbind(2))  # each (B, heads, N, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention(q, k, v, self.backend)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op=None) -> None:
        """diffusers' hook: `enable_xformers_memory_efficient_attention()` on the model or a pipeline reaches here."""
        if attention_op is not None:
            raise ValueError("UAEDiT's xformers backend uses xformers' default attention_op")
        backend = "xformers" if valid else "sdpa"
        check_attention_backend_available(backend)
        self.backend = backend


class SwiGLU(nn.Module):
    """SwiGLU feed-forward: w3(SiLU(a) * b) with [a, b] = w12(x) from one fused projection."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class GeluMlp(nn.Module):
    """Classic DiT feed-forward with tanh-approximated GELU."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero conditioning.

    `cond` arrives SiLU-activated (once per model, not once per block) and is (B, 1, D), shared by all tokens,
    or (B, N, D), one condition per token (DiT^DH head)."""

    def __init__(self, dim, num_heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm, wo_shift, backend):
        super().__init__()
        self.norm1 = build_norm(dim, use_rmsnorm)
        self.attn = SelfAttention(dim, num_heads, use_qknorm, use_rmsnorm, backend)
        self.norm2 = build_norm(dim, use_rmsnorm)
        mlp_hidden = int(dim * mlp_ratio)
        self.mlp = SwiGLU(dim, int(2 / 3 * mlp_hidden)) if use_swiglu else GeluMlp(dim, mlp_hidden)
        # adaLN-Zero: the condition regresses per-channel shift/scale of each norm and a gate on each residual
        # branch; the regressor is zero-initialised, so every block starts as the identity.
        self.wo_shift = wo_shift
        self.adaLN_modulation = nn.Linear(dim, (4 if wo_shift else 6) * dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rope=None) -> torch.Tensor:
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(cond).chunk(4, dim=-1)
            shift_msa = shift_mlp = None
        else:
            modulation = self.adaLN_modulation(cond).chunk(6, dim=-1)
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        x = torch.addcmul(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope))
        return torch.addcmul(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class FinalLayer(nn.Module):
    """Norm, adaLN shift/scale (no gate; SiLU-activated `cond` as in the blocks), then tokens -> patch values."""

    def __init__(self, dim: int, out_dim: int, use_rmsnorm: bool):
        super().__init__()
        self.norm_final = build_norm(dim, use_rmsnorm)
        self.adaLN_modulation = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(cond).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def _at_positions(table: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """The rows of a per-grid-cell table (h*w, D) for the tokens at the given flat positions (all rows if None)."""
    return table if positions is None else table[positions]


class UAEDiT(ModelMixin, ConfigMixin):
    """Class-conditional velocity model on a latent grid (B, in_channels, sample_size, sample_size).

    The defaults are the paper's DiT^DH-XL on the 768x16x16 UAE/RAE latent with the official LightningDiT
    options. `head_depth=0` gives a plain DiT. Class id `num_classes` is the null label for CFG.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 16,
        patch_size: int = 1,
        in_channels: int = 768,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        head_hidden_size: int | None = 2048,
        head_depth: int = 2,
        head_num_heads: int | None = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        use_swiglu: bool = True,
        use_rmsnorm: bool = True,
        use_rope: bool = True,
        use_qknorm: bool = False,
        use_pos_embed: bool = True,
        wo_shift: bool = False,
        time_embedding_type: str = "gaussian_fourier",
        attention_backend: str = "sdpa",
        frequency_tokens: int | None = None,
        coefficients_per_token: int = 1,
        num_time_embeddings: int = 1,
        prediction_type: str = "velocity",
        coarse_tokens: int | None = None,
        coarse_time: float = 0.5,
    ):
        super().__init__()
        check_attention_backend(attention_backend)
        if time_embedding_type not in TIME_EMBEDDING_TYPES:
            raise ValueError(f"time_embedding_type must be one of {TIME_EMBEDDING_TYPES}; got {time_embedding_type!r}")
        if sample_size % patch_size:
            raise ValueError(f"sample_size {sample_size} is not divisible by patch_size {patch_size}")
        if not 0.0 <= class_dropout_prob <= 1.0:
            raise ValueError(f"class_dropout_prob must lie in [0, 1]; got {class_dropout_prob}")
        self.has_head = head_depth > 0
        head_hidden_size = head_hidden_size or hidden_size
        head_num_heads = head_num_heads or num_heads
        widths = [("trunk", hidden_size, num_heads)] + ([("head", head_hidden_size, head_num_heads)] if self.has_head else [])
        for name, width, heads in widths:
            if width % heads or (use_rope and (width // heads) % 4):
                raise ValueError(f"{name} width {width} must split into {heads} heads "
                                 "(head_dim divisible by 4 for RoPE)")
        if num_time_embeddings < 1 or hidden_size % num_time_embeddings:
            raise ValueError(f"num_time_embeddings must be >= 1 and divide hidden_size {hidden_size}; "
                             f"got {num_time_embeddings}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")
        if prediction_type == "sample" and num_time_embeddings != 1:
            raise ValueError("prediction_type='sample' turns x into a velocity with one time t; it cannot take "
                             f"{num_time_embeddings} band times")
        if frequency_tokens is not None and patch_size != 1:
            raise ValueError(f"frequency_tokens needs patch_size 1 (coefficients_per_token groups them); got {patch_size}")
        if coefficients_per_token < 1 or (coefficients_per_token > 1 and frequency_tokens is None):
            raise ValueError("coefficients_per_token must be >= 1, and above 1 only with frequency_tokens; "
                             f"got {coefficients_per_token} (frequency_tokens={frequency_tokens})")
        if frequency_tokens is not None and frequency_tokens % coefficients_per_token:
            raise ValueError(f"frequency_tokens={frequency_tokens} is not divisible by coefficients_per_token="
                             f"{coefficients_per_token}")
        if coarse_tokens is not None:
            if frequency_tokens is None:
                raise ValueError(f"coarse_tokens={coarse_tokens} needs frequency_tokens")
            num_tokens = frequency_tokens // coefficients_per_token
            if not 1 <= coarse_tokens < num_tokens:
                raise ValueError(f"coarse_tokens must lie in [1, {num_tokens}) frequency tokens; got {coarse_tokens}")
            if not 0.0 < coarse_time < 1.0:
                raise ValueError(f"coarse_time must lie in (0, 1); got {coarse_time}")
            if num_time_embeddings != 1:
                raise ValueError(f"coarse_tokens switches on one time t; it cannot take {num_time_embeddings} band "
                                 "times")
        if use_pos_embed and hidden_size % 4:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by 4 for the 2-D sin-cos pos-embed")
        self.gradient_checkpointing = False

        grid = sample_size // patch_size
        group = coefficients_per_token
        patch_dim = in_channels * (patch_size * patch_size if frequency_tokens is None else group)
        block_options = dict(mlp_ratio=mlp_ratio, use_qknorm=use_qknorm, use_swiglu=use_swiglu,
                             use_rmsnorm=use_rmsnorm, wo_shift=wo_shift, backend=attention_backend)
        # Frequency tokens: the model sees only the first N zig-zag DCT coefficients of its input and returns a
        # velocity inside that low-pass subspace. Each run of `coefficients_per_token` consecutive coefficients is
        # one token (a 1-D patch along the zig-zag), placed at its first coefficient's (row, column) frequency.
        self.frequency_layout = None if frequency_tokens is None else LowFrequencyTokens(grid, grid, frequency_tokens)
        positions = None if self.frequency_layout is None else self.frequency_layout.indices[::group]
        kernel = patch_size if frequency_tokens is None else (1, group)
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel, stride=kernel)
        self.t_embedder = (TimestepEmbedder(hidden_size, time_embedding_type) if num_time_embeddings == 1 else
                           BandTimestepEmbedder(hidden_size, num_time_embeddings, time_embedding_type))
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        if use_pos_embed:
            pos_embed = _at_positions(sincos_pos_embed_2d(hidden_size, grid), positions)
            self.register_buffer("pos_embed", pos_embed[None], persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, **block_options) for _ in range(depth))
        if self.has_head:
            widen = head_hidden_size != hidden_size
            self.head_cond_proj = nn.Linear(hidden_size, head_hidden_size) if widen else nn.Identity()
            self.head_x_embedder = nn.Conv2d(in_channels, head_hidden_size, kernel, stride=kernel)
            self.head_blocks = nn.ModuleList(
                DiTBlock(head_hidden_size, head_num_heads, **block_options) for _ in range(head_depth))
        if use_rope:
            for name, width, heads in widths:
                cos, sin = rope_tables_2d(width // heads, grid)
                self.register_buffer(f"{name}_rope_cos", _at_positions(cos, positions), persistent=False)
                self.register_buffer(f"{name}_rope_sin", _at_positions(sin, positions), persistent=False)
        self.final_layer = FinalLayer(head_hidden_size if self.has_head else hidden_size, patch_dim, use_rmsnorm)
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "UAEDiT":
        """A fresh model of a named size (DIT_PRESETS), with any other config values as keyword overrides."""
        if name not in DIT_PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(DIT_PRESETS)}")
        return cls(**{**DIT_PRESETS[name], **overrides})

    def set_attention_backend(self, backend: str) -> None:
        """Run every attention layer with `backend`: "sdpa", "xformers" (needs the xformers package; CUDA tensors)
        or "auto" (xformers on CUDA when installed, else SDPA). A runtime choice, as diffusers' method of this name:
        the config's `attention_backend` (the backend a freshly built or loaded model starts with) is unchanged, so
        a model saved after training with xformers still loads on a machine without it."""
        check_attention_backend_available(backend)
        for module in self.modules():
            if isinstance(module, SelfAttention):
                module.backend = backend

    def initialize_weights(self) -> None:
        # DiT initialisation: xavier linears, patch embeds like linears, adaLN-Zero and output layer at zero.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for embedder in [self.x_embedder] + ([self.head_x_embedder] if self.has_head else []):
            nn.init.xavier_uniform_(embedder.weight.view(embedder.weight.shape[0], -1))
            nn.init.zeros_(embedder.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for module in self.t_embedder.modules():
            if isinstance(module, TimestepEmbedder):
                nn.init.normal_(module.mlp[0].weight, std=0.02)
                nn.init.normal_(module.mlp[2].weight, std=0.02)
        for block in list(self.blocks) + list(self.head_blocks if self.has_head else []):
            nn.init.zeros_(block.adaLN_modulation.weight)
            nn.init.zeros_(block.adaLN_modulation.bias)
        for layer in (self.final_layer.adaLN_modulation, self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, sample: torch.Tensor, timestep, class_labels, return_dict: bool = True):
        """sample (B, C, H, W) noisy latent, timestep float (B,) or scalar in [0, 1] (1 = noise) — or (B, K) band
        times when the model has K = num_time_embeddings > 1 — and class_labels int (B,) in [0, num_classes].
        Returns the velocity eps - x, shaped like `sample`.

        Only shapes and dtypes are checked here: a check of label values would make the host wait for the device on
        every step, so callers (the pipeline) validate labels once. A coarse-to-fine model does read on the host
        which rows are past coarse_time (their sequences differ in length)."""
        timestep, class_labels = self._check_inputs(sample, timestep, class_labels)
        if self.config.coarse_tokens is None:
            velocity = self._velocity(sample, timestep, class_labels)
        else:
            coarse = timestep > self.config.coarse_time
            if coarse.all():  # a sampler step: one time for the batch
                velocity = self._velocity(sample, timestep, class_labels, self.config.coarse_tokens)
            elif not coarse.any():
                velocity = self._velocity(sample, timestep, class_labels)
            else:  # a training batch with times on both sides: each part at its own token count, then back in order
                parts = [coarse.nonzero().squeeze(1), (~coarse).nonzero().squeeze(1)]
                velocity = torch.cat([self._velocity(sample[rows], timestep[rows], class_labels[rows], tokens)
                                      for rows, tokens in zip(parts, (self.config.coarse_tokens, None))])
                velocity = velocity[torch.cat(parts).argsort()]
        return Transformer2DModelOutput(sample=velocity) if return_dict else (velocity,)

    def _velocity(self, sample, timestep, class_labels, num_tokens: int | None = None) -> torch.Tensor:
        """The velocity from the network run on all tokens, or on the first `num_tokens` frequency tokens."""
        t_emb = self.t_embedder(timestep)
        cond = t_emb + self.y_embedder(class_labels)
        if self.has_head:
            cond = F.silu(cond)  # official DiT^DH: the trunk sees SiLU(t + y), then the usual adaLN SiLU again
        cond = F.silu(cond[:, None])  # the adaLN input activation, shared by all blocks and the final layer
        tokens = self._embed_patches(self.x_embedder, sample, num_tokens)
        if self.config.use_pos_embed:
            tokens = tokens + self.pos_embed[:, :num_tokens]
        tokens = self._run_blocks(self.blocks, tokens, cond, self._rope("trunk", num_tokens))
        if self.has_head:
            # The trunk's output (plus time) becomes a per-token condition for the head, which re-embeds x_t.
            cond = F.silu(self.head_cond_proj(F.silu(tokens + t_emb[:, None])))
            tokens = self._embed_patches(self.head_x_embedder, sample, num_tokens)
            tokens = self._run_blocks(self.head_blocks, tokens, cond, self._rope("head", num_tokens))
        prediction = self.final_layer(tokens, cond)
        if self.frequency_layout is None:
            return self._to_velocity(sample, self._unpatchify(prediction), timestep)
        # Frequency tokens: the velocity of the coefficients the model sees, in the low-pass subspace.
        predicted = self._coefficients(prediction)
        count = predicted.shape[-1]
        if self.config.prediction_type == "velocity" and count == self.frequency_layout.num_tokens:
            return self.frequency_layout.from_tokens(predicted)  # all coefficients predicted, x_t not needed
        noisy = self.frequency_layout.to_tokens(sample)
        velocity = self._to_velocity(noisy[..., :count], predicted, timestep)
        if count < noisy.shape[-1]:  # the coarse stage: the coefficients not generated yet follow pending_velocity
            pending = pending_velocity(noisy[..., count:], timestep.reshape(-1, 1, 1))
            velocity = torch.cat([velocity, pending.to(velocity.dtype)], -1)
        return self.frequency_layout.from_tokens(velocity)

    def _to_velocity(self, noisy, prediction, timestep) -> torch.Tensor:
        if self.config.prediction_type == "velocity":
            return prediction
        # the network predicted x: v = (x_t - x) / t
        t = timestep.float().clamp(min=SAMPLE_PREDICTION_MIN_TIME).reshape(-1, *[1] * (noisy.ndim - 1))
        return ((noisy.float() - prediction.float()) / t).to(prediction.dtype)

    def _check_inputs(self, sample, timestep, class_labels) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        if sample.ndim != 4 or sample.shape[1] != config.in_channels:
            raise ValueError(f"sample must be (B, in_channels={config.in_channels}, H, W); got {tuple(sample.shape)}")
        batch, height, width = sample.shape[0], sample.shape[2], sample.shape[3]
        if height % config.patch_size or width % config.patch_size:
            raise ValueError(f"sample spatial size {height}x{width} is not divisible by patch_size {config.patch_size}")
        if height != config.sample_size or width != config.sample_size:
            raise ValueError(f"sample spatial size {height}x{width} differs from sample_size {config.sample_size} "
                             "that the position embeddings were built for")
        times = config.num_time_embeddings
        shape = (batch,) if times == 1 else (batch, times)
        if isinstance(timestep, (int, float)):
            timestep = torch.full(shape, float(timestep), device=sample.device)  # filled on the device, no copy
        else:
            timestep = torch.as_tensor(timestep, device=sample.device)
            timestep = timestep.expand(shape) if timestep.ndim == 0 else timestep
        if timestep.shape != shape:
            expected = f"({batch},)" if times == 1 else f"({batch}, {times}): one time per band clock"
            raise ValueError(f"timestep must be a scalar or shaped {expected}; got {tuple(timestep.shape)}")
        class_labels = torch.as_tensor(class_labels, device=sample.device)
        if class_labels.shape != (batch,) or class_labels.is_floating_point():
            raise ValueError(f"class_labels must be integers shaped ({batch},); got {class_labels.dtype} "
                             f"{tuple(class_labels.shape)}")
        return timestep, class_labels

    def _rope(self, name: str, num_tokens: int | None = None):
        if not self.config.use_rope:
            return None
        return getattr(self, f"{name}_rope_cos")[:num_tokens], getattr(self, f"{name}_rope_sin")[:num_tokens]

    def _run_blocks(self, blocks: nn.ModuleList, tokens, cond, rope) -> torch.Tensor:
        for block in blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                tokens = self._gradient_checkpointing_func(block, tokens, cond, rope)
            else:
                tokens = block(tokens, cond, rope)
        return tokens

    def _embed_patches(self, embedder: nn.Conv2d, sample: torch.Tensor, num_tokens: int | None = None):
        # (B, N, D), tokens in row-major order (or zig-zag order of frequency). Contiguous: the residual stream keeps
        # the layout of its first tensor, and a transposed one would make every LayerNorm and Linear copy it again.
        if self.frequency_layout is not None:
            coefficients = self.frequency_layout.to_tokens(sample)
            if num_tokens is not None:
                coefficients = coefficients[..., :num_tokens * self.config.coefficients_per_token]
            sample = coefficients.unsqueeze(-2)  # (B, C, 1, N): a (1, G) patch per token
        return embedder(sample).flatten(2).transpose(1, 2).contiguous()

    def _coefficients(self, tokens: torch.Tensor) -> torch.Tensor:
        # Each frequency token holds (G, C): its G coefficients of every channel. (B, N, G*C) -> (B, C, N*G) in
        # zig-zag order.
        return tokens.reshape(tokens.shape[0], -1, self.config.in_channels).transpose(1, 2)

    def _unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        # Each token holds a (p, p, C) patch, as in DiT and the official RAE code.
        p, channels = self.config.patch_size, self.config.in_channels
        grid = self.config.sample_size // p
        patches = tokens.reshape(tokens.shape[0], grid, grid, p, p, channels)
        return patches.permute(0, 5, 1, 3, 2, 4).reshape(tokens.shape[0], channels, grid * p, grid * p)
