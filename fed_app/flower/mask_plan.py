"""MaskPlan: which entries each client trains in a sparse federated run, in one shape: a mask per partition id,
where mask-scope 'global' gives every partition the same object. Saved once, before the round-0 checkpoint,
and loaded on resume, so calibration is never redone. Masks travel, and are saved, as packed bits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fed_app.config import RunConfig
from fed_app.runs.rundir import RunDir
from masking.calibrate import Masks, density_of


@dataclass(frozen=True)
class MaskPlan:
    per_partition: dict[int, Masks]
    shared: Masks | None  # the global mask, when every partition holds this same one

    @classmethod
    def global_mask(cls, masks: Masks, num_clients: int) -> MaskPlan:
        return cls({p: masks for p in range(num_clients)}, masks)

    @classmethod
    def local_masks(cls, per_partition: dict[int, Masks]) -> MaskPlan:
        return cls(dict(per_partition), None)

    @property
    def density(self) -> float:
        """The trainable fraction: of the global mask, or the mean over the clients' own masks."""
        if self.shared is not None:
            return density_of(self.shared)
        return sum(map(density_of, self.per_partition.values())) / len(self.per_partition)

    def save(self, run_dir: RunDir) -> None:
        """mask.pt (+ mask_stats.json) for a global mask; client_masks.pt (packed bits per partition) else."""
        if self.shared is not None:
            run_dir.save_mask(self.shared)
        else:
            run_dir.save_client_masks({p: torch.from_numpy(pack_masks(m)) for p, m in self.per_partition.items()})

    @classmethod
    def load(cls, run_dir: RunDir, shapes: dict[str, torch.Size], cfg: RunConfig) -> MaskPlan | None:
        """The plan calibration saved, or None for a dense run."""
        if cfg.optimizer != "sparse-sgdm":
            return None
        if cfg.mask_scope == "global":
            return cls.global_mask(run_dir.load_mask(), cfg.num_clients)
        bits = run_dir.load_client_masks()
        return cls.local_masks({p: unpack_masks(b, shapes) for p, b in bits.items()})


def pack_masks(masks: Masks) -> np.ndarray:
    """All masks, in their dict order, as one packed uint8 bit array."""
    flat = torch.cat([m.flatten().cpu() for m in masks.values()]).numpy()
    return np.packbits(flat)


def unpack_masks(bits: np.ndarray | torch.Tensor, shapes: dict[str, torch.Size]) -> Masks:
    """Inverse of pack_masks for parameters of these shapes (in this order); the bits as an array or a tensor. Bits
    of another length (a client's reply, a damaged file) are a ValueError: numpy would cut extra bits silently and
    pad missing ones with whatever memory held."""
    sizes = [int(np.prod(s)) for s in shapes.values()]
    bits = bits.cpu().numpy() if torch.is_tensor(bits) else bits
    bits = np.asarray(bits)
    if bits.dtype != np.uint8 or bits.shape != (-(-sum(sizes) // 8),):
        raise ValueError(f"mask bits of shape {bits.shape} and dtype {bits.dtype} do not fit {sum(sizes)} entries "
                         f"(uint8, {-(-sum(sizes) // 8)} bytes)")
    flat = torch.from_numpy(np.unpackbits(bits, count=sum(sizes)).astype(bool))
    return {n: part.view(s) for (n, s), part in zip(shapes.items(), flat.split(sizes))}
