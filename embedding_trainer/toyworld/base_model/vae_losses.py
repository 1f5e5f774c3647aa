"""The VAE stage's loss: pixel L1, plus L1 on the colour of each latent cell, on edges and on texture statistics,
with the shape's pixels weighted up (why each term: embedding_trainer/toyworld/README.md), and a small KL term."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .plan import VaeTraining


def vae_losses(
    rec: torch.Tensor, x: torch.Tensor, kl: torch.Tensor, cfg: VaeTraining, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """The VAE's loss and its parts. ``weight`` ``[N, 1, H, W]``: per-pixel weights of the pixel and colour terms."""
    if weight is None:
        weight = torch.ones_like(x[:, :1])
    pixel = ((rec - x).abs() * weight).sum() / (weight.sum() * x.shape[1])
    if cfg.colour_weight:
        pool = cfg.colour_pool
        cell_weight = F.avg_pool2d(weight, pool)
        cells = (F.avg_pool2d(rec, pool) - F.avg_pool2d(x, pool)).abs() * cell_weight
        colour = cells.sum() / (cell_weight.sum() * x.shape[1])
    else:
        colour = rec.new_zeros(())
    if cfg.edge_weight:
        # Differences between neighbours: edges and the shapes' textures (weighted like the pixels).
        dx = (rec[..., :, 1:] - rec[..., :, :-1]) - (x[..., :, 1:] - x[..., :, :-1])
        dy = (rec[..., 1:, :] - rec[..., :-1, :]) - (x[..., 1:, :] - x[..., :-1, :])
        wx, wy = weight[..., :, 1:], weight[..., 1:, :]
        edges = (dx.abs() * wx).sum() / (wx.sum() * x.shape[1]) + (dy.abs() * wy).sum() / (wy.sum() * x.shape[1])
    else:
        edges = rec.new_zeros(())
    texture = texture_statistics_loss(rec, x, weight) if cfg.texture_weight else rec.new_zeros(())
    total = pixel + cfg.colour_weight * colour + cfg.edge_weight * edges + cfg.texture_weight * texture
    total = total + cfg.kl_weight * kl
    parts = {
        "loss": total.item(),
        "pixel": pixel.item(),
        "colour": colour.item(),
        "edge": edges.item(),
        "texture": texture.item(),
        "kl": kl.item(),
    }
    return total, parts


def _gradient_magnitudes(x: torch.Tensor) -> torch.Tensor:
    """``[N, 4*C, H-1, W-1]``: absolute differences along x, y and the two diagonals."""
    a, b, c, d = x[..., :-1, :-1], x[..., :-1, 1:], x[..., 1:, :-1], x[..., 1:, 1:]
    return torch.cat([(b - a).abs(), (c - a).abs(), (d - a).abs(), (c - b).abs()], dim=1)


def texture_statistics_loss(rec: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, pool: int = 8) -> torch.Tensor:
    """L1 between ``pool``-pixel averages of directional gradient magnitudes (phase-blind texture statistics)."""
    w = F.avg_pool2d(weight[..., 1:, 1:], pool, ceil_mode=True)
    stats_rec = F.avg_pool2d(_gradient_magnitudes(rec), pool, ceil_mode=True)
    stats_x = F.avg_pool2d(_gradient_magnitudes(x), pool, ceil_mode=True)
    return ((stats_rec - stats_x).abs() * w).sum() / (w.sum() * stats_x.shape[1])
