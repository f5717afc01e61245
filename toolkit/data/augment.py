"""Batched data augmentation on the training device: random affine plus elastic distortion.

Scanned MNIST digits are clean and centred; people's drawings are slanted, shifted and wobbly.
One `grid_sample` per batch applies both distortions (Simard et al., 2003) without any
per-sample Python work.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_affine_elastic(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    max_rotation_deg: float = 12.0,
    scale_range: tuple[float, float] = (0.9, 1.1),
    max_shift: float = 0.12,
    elastic_strength: float = 0.04,
) -> torch.Tensor:
    """Distort a batch [N, 1, H, W] of [0, 1] pixels; the background stays 0."""
    n, device = images.shape[0], images.device

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return torch.empty(shape, device=device).uniform_(low, high, generator=generator)

    angle = uniform(-1.0, 1.0, n) * math.radians(max_rotation_deg)
    scale = uniform(*scale_range, n)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos, -sin, uniform(-max_shift, max_shift, n)], dim=1),
            torch.stack([sin, cos, uniform(-max_shift, max_shift, n)], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # Elastic part: a coarse random displacement field, smoothly upsampled.
    coarse = uniform(-1.0, 1.0, n, 2, 4, 4)
    field = F.interpolate(coarse, size=images.shape[-2:], mode="bicubic", align_corners=False)
    grid = grid + elastic_strength * field.permute(0, 2, 3, 1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
