"""Device slots of the runner: `--devices 0,1,cpu` -> one slot per entry, each run in it pinned to its device
(CUDA_VISIBLE_DEVICES) and, for CPU slots, to its share of the cores."""

from __future__ import annotations

import os
from dataclasses import dataclass

from fed_app.errors import UserError


class DeviceError(UserError, ValueError):
    """A --devices entry that is not a device of this machine."""


@dataclass(frozen=True)
class Slot:
    """Where one run at a time goes: a GPU (pinned with CUDA_VISIBLE_DEVICES) or the CPU; 'auto' leaves the
    environment as it is (one slot, every visible device)."""

    name: str
    threads: int = 0  # CPU slots: the cores each gets (the machine's shared out), so that slots do not thrash

    @property
    def env(self) -> dict[str, str]:
        if self.name == "auto":
            return {}
        if self.name == "cpu":
            return {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(self.threads),
                    "MKL_NUM_THREADS": str(self.threads)}
        return {"CUDA_VISIBLE_DEVICES": self.name}


def parse_devices(text: str | None, gpu_count: int) -> list[Slot]:
    """`0,1,cpu` -> slots; one sentence for an entry that is neither `cpu` nor a GPU index of this machine."""
    if not text:
        return [Slot("auto")]
    slots = []
    for entry in (e.strip() for e in text.split(",")):
        if entry != "cpu" and not (entry.isdigit() and int(entry) < gpu_count):
            there = f"GPUs 0..{gpu_count - 1}" if gpu_count else "no GPU"
            raise DeviceError(f"--devices entry {entry!r} is not a device here (this machine has {there}); "
                              f"give GPU indices and/or cpu, e.g. --devices 0,1 or --devices cpu,cpu")
        slots.append(Slot(entry))
    cpu_slots = sum(slot.name == "cpu" for slot in slots)
    cores = max(1, (os.cpu_count() or 1) // max(1, cpu_slots))
    return [Slot(slot.name, cores if slot.name == "cpu" else 0) for slot in slots]
