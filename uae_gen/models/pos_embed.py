"""Fixed 2-D sin-cos position embeddings, MAE's layout, shared by the DiT and the pixel decoder.

Channels [0, D/2) encode the token's column and [D/2, D) its row, each half as [sin, cos] of the position times
frequencies 1 / 10000^(i / (D/4)). This is the table of MAE's ``get_2d_sincos_pos_embed`` that DiT, RAE, UAE and
diffusers all use, so released weights see the positions they were trained with.
"""

import torch


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int | None = None) -> torch.Tensor:
    """(grid_h * grid_w, dim) float32 table, tokens in row-major order."""
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    grid_w = grid_h if grid_w is None else grid_w
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    row, col = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64),
                              indexing="ij")

    def embed(position):
        angles = position.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed(col), embed(row)], dim=1).float()
