"""A run's directory: config.json, append-only rows.jsonl, atomic checkpoint.pt, DONE or DIVERGED marker."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from fed_app.config import NOT_RESULTS, ConfigError, RunConfig, to_kebab

log = logging.getLogger(__name__)


class RunDir:
    """Owns the files of one run; nothing else writes them."""

    def __init__(self, path: Path):
        self.path = path
        self.config_file = path / "config.json"
        self.rows_file = path / "rows.jsonl"
        self.checkpoint_file = path / "checkpoint.pt"
        self.done_file = path / "DONE"
        self.diverged_file = path / "DIVERGED"  # holds the divergence guard's reason

    @classmethod
    def for_config(cls, cfg: RunConfig, group: str) -> RunDir:
        """results/<group>/<run-id> unless cfg.run_dir names one; absolute, so Flower workers agree."""
        path = Path(cfg.run_dir).expanduser() if cfg.run_dir else Path("results") / group / cfg.run_id()
        return cls(path.resolve())

    def bind(self, cfg: RunConfig) -> None:
        """Write config.json, or check that the one already there is this run's (before any work)."""
        mine = cfg.to_dict()
        if self.config_file.exists():
            theirs = json.loads(self.config_file.read_text())
            diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v and k not in NOT_RESULTS}
            if diff:
                key, (old, new) = next(iter(diff.items()))
                raise ConfigError(
                    f"run-dir {str(self.path)!r} holds a run with {to_kebab(key)}={old!r}, not {new!r}; "
                    f"pick another run-dir (or delete that one to start over)."
                )
            return
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.config_file, json.dumps(mine, indent=2, sort_keys=True).encode())

    @property
    def done(self) -> bool:
        return self.done_file.exists()

    def mark_done(self) -> None:
        atomic_write_bytes(self.done_file, b"")

    @property
    def diverged(self) -> str | None:
        """Why the divergence guard stopped this run (fed_app/runs/divergence.py), or None."""
        return self.diverged_file.read_text() if self.diverged_file.exists() else None

    @property
    def finished(self) -> bool:
        """Nothing is left to run: DONE, or stopped by the divergence guard."""
        return self.done or self.diverged_file.exists()

    def mark_diverged(self, reason: str) -> None:
        atomic_write_bytes(self.diverged_file, reason.encode())

    def append_row(self, row: dict[str, Any]) -> None:
        with open(self.rows_file, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rows(self) -> list[dict[str, Any]]:
        if not self.rows_file.exists():
            return []
        lines = self.rows_file.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def keep_rows(self, key: str, upto: int) -> None:
        """Drop rows written after the last checkpoint (row[key] > upto), atomically."""
        if not self.rows_file.exists():
            return
        kept = [r for r in self.rows() if r[key] <= upto]
        atomic_write_bytes(self.rows_file, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def save_mask(self, masks: dict[str, torch.Tensor]) -> None:
        """mask.pt (name -> bool tensor, True = trainable) and its per-layer densities, mask_stats.json."""
        from masking.calibrate import mask_stats, save_masks

        save_masks(masks, self.path / "mask.pt")
        atomic_write_bytes(self.path / "mask_stats.json", json.dumps(mask_stats(masks), indent=1).encode())

    def save_shards(self, counts) -> None:
        """shards.json: each client's image count per class (a (clients, classes) table), for the report."""
        atomic_write_bytes(self.path / "shards.json", json.dumps({"class_counts": counts.tolist()}).encode())

    def save_client_masks(self, bits: dict[int, Any]) -> None:
        """client_masks.pt: partition id -> packed mask bits (mask-scope 'local')."""
        _atomic_torch_save(bits, self.path / "client_masks.pt")

    def resume(self, key: str) -> dict[str, Any] | None:
        """The last checkpoint (None when fresh), with the rows written after it dropped: the one restore
        step of every run, keyed by its step column ('epoch' or 'round')."""
        ckpt = self.load_checkpoint()
        self.keep_rows(key, -1 if ckpt is None else ckpt[key])
        if ckpt is not None:
            log.info("resuming %s after %s %d", self.path, key, ckpt[key])
        return ckpt

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        _atomic_torch_save(state, self.checkpoint_file)

    def load_checkpoint(self) -> dict[str, Any] | None:
        if not self.checkpoint_file.exists():
            return None
        return torch.load(self.checkpoint_file, map_location="cpu", weights_only=False)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    _fsync_replace(tmp, path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    _fsync_replace(tmp, path)


def _fsync_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
