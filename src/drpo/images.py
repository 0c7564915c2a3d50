"""The one conversion of generated images to 8-bit pixels: every PNG the pipeline writes and every image the
detector or a black-box reward sees goes through it, so that all of them score the same pixels. And its inverse,
for images read from files (renders, preference datasets)."""

from __future__ import annotations

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3) on the CPU."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu()


def from_uint8(pixels: np.ndarray) -> torch.Tensor:
    """uint8 images (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
