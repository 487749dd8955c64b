"""Batches on the device: index batches of a shard (`batch_stream`) and the uint8 -> normalized float
transform at the model's input size, with augmentation (`BatchTransform`). No DataLoader anywhere."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchTransform:
    """uint8 batch -> normalized float batch at the model's input size; augmentation at 32 px, on device.
    The resize uses the model's interpolation (timm's data configuration: bicubic for DINO), clamped to [0, 1]
    as an 8-bit resize would be."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    augment: bool = False
    pad: int = 4
    interpolation: str = "bicubic"

    @classmethod
    def for_model(cls, spec, augment: bool = False) -> BatchTransform:
        """The transform a ModelSpec asks for (input size, interpolation, mean, std)."""
        return cls(spec.input_size, spec.mean, spec.std, augment=augment, interpolation=spec.interpolation)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = images.float().div_(255.0)
        if self.augment:
            x = self._crop_and_flip(x, generator)
        if x.shape[-1] != self.size:
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode=self.interpolation,
                                                align_corners=False).clamp_(0.0, 1.0)
        return (x - _channel_stats(self.mean, x.device)) / _channel_stats(self.std, x.device)

    def _crop_and_flip(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        b, c, h, w = x.shape
        padded = torch.nn.functional.pad(x, (self.pad,) * 4)
        off = torch.randint(0, 2 * self.pad + 1, (2, b), device=x.device, generator=generator)
        rows = off[0, :, None] + torch.arange(h, device=x.device)  # (B, H)
        cols = off[1, :, None] + torch.arange(w, device=x.device)  # (B, W)
        flip = torch.rand(b, device=x.device, generator=generator) < 0.5
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        bi = torch.arange(b, device=x.device)[:, None, None, None]
        ci = torch.arange(c, device=x.device)[None, :, None, None]
        return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


@functools.lru_cache(maxsize=16)
def _channel_stats(values: tuple[float, float, float], device: torch.device) -> torch.Tensor:
    """Normalization constants, made once per device rather than copied to it every batch."""
    return torch.tensor(values, device=device).view(1, 3, 1, 1)


def batch_stream(indices: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Index batches forever: a seeded permutation of `indices` per pass, the last batch of a pass short."""
    while True:
        perm = indices[torch.randperm(len(indices), device=indices.device, generator=generator)]
        yield from perm.split(batch_size)
