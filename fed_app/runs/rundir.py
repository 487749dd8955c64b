"""A run's directory: config.json, append-only rows.jsonl, atomic checkpoint.pt (and the one before it), DONE or
DIVERGED marker; and which checkpoint a run resumes from.

A damaged folder recovers or says why not: a checkpoint that is damaged (cut short, corrupt, or holding more than
tensors and plain values: nothing is unpickled that could run code) is kept as `<name>.bad` and gives way to the
one before it, which is kept until the next is safely written; a torn last line of rows.jsonl (a write cut short)
is dropped with a warning, and a checkpoint ahead of the rows gives way too, so the missing rows are redone; a
file the disk will not give back (EIO, EACCES) stops the run with one sentence, nothing changed; a write that
finds the disk full stops the run with one sentence, its files as they were, and the same command resumes once
there is room. How each file is written and read is fed_app/runs/files.py."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from fed_app.config import NOT_RESULTS, ConfigError, RunConfig, to_kebab
from fed_app.runs.files import (DamagedRunError, DiskFullError, UnreadableError, atomic_torch_save,
                                atomic_write_bytes, fsync_dir, read_regular, read_torch, readable, room_for, set_aside,
                                torch_bytes, write_whole)

__all__ = ["DamagedRunError", "DiskFullError", "RunDir", "UnreadableError", "read_rows"]

log = logging.getLogger(__name__)


class RunDir:
    """Owns the files of one run; nothing else writes them."""

    def __init__(self, path: Path):
        self.path = path
        self.config_file = path / "config.json"
        self.rows_file = path / "rows.jsonl"
        self.checkpoint_file = path / "checkpoint.pt"
        self.previous_file = path / "checkpoint.prev.pt"  # kept until the next checkpoint is safely written
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

    def finished_whole(self, key: str, total: int) -> bool:
        """Nothing is left to run: DIVERGED, or DONE with every row 0..total there. A DONE run whose rows no longer
        reach its last step (a copy or a disk that lost the tail) is unmarked: it resumes and redoes them."""
        if self.diverged_file.exists() or not self.done:
            return self.diverged_file.exists()
        if rows_reach(self.rows_file, key, total):
            return True
        log.warning("%s is marked DONE but its rows end before %s %d; it resumes to redo them", self.path, key, total)
        self.done_file.unlink()
        fsync_dir(self.path)
        return False

    def mark_diverged(self, reason: str) -> None:
        atomic_write_bytes(self.diverged_file, reason.encode())

    def append_row(self, row: dict[str, Any]) -> None:
        """One line, on disk (fsync); a write that fails part-way is cut back off, so no half row is left."""
        data = (json.dumps(row) + "\n").encode()
        created = not self.rows_file.exists()
        with room_for(self.rows_file):
            fd = os.open(self.rows_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            size = os.fstat(fd).st_size
            try:
                written = 0
                while written < len(data):  # unbuffered: a failure is raised here, not again at close
                    written += os.write(fd, data[written:])
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)
                raise
            finally:
                os.close(fd)
        if created:  # the file's name is on disk too
            fsync_dir(self.path)

    def rows(self) -> list[dict[str, Any]]:
        return read_rows(self.rows_file)

    def keep_rows(self, key: str, upto: int, rows: list[dict[str, Any]] | None = None) -> None:
        """Drop rows written after the last checkpoint (row[key] > upto), atomically (`rows`: those read just now)."""
        if not self.rows_file.exists():
            return
        kept = [r for r in (self.rows() if rows is None else rows) if r[key] <= upto]
        atomic_write_bytes(self.rows_file, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def save_mask(self, masks: dict[str, torch.Tensor]) -> None:
        """mask.pt (name -> bool tensor, True = trainable) and its per-layer densities, mask_stats.json."""
        from masking.calibrate import mask_stats, save_masks

        buffer = io.BytesIO()
        save_masks(masks, buffer)
        atomic_write_bytes(self.path / "mask.pt", buffer.getbuffer())
        atomic_write_bytes(self.path / "mask_stats.json", json.dumps(mask_stats(masks), indent=1).encode())

    def load_mask(self) -> dict[str, torch.Tensor]:
        """mask.pt as save_mask wrote it; a damaged one is a DamagedRunError."""
        return {n: m.to(torch.bool) for n, m in read_torch(self.path / "mask.pt").items()}

    def save_shards(self, counts) -> None:
        """shards.json: each client's image count per class (a (clients, classes) table), for the report."""
        atomic_write_bytes(self.path / "shards.json", json.dumps({"class_counts": counts.tolist()}).encode())

    def save_client_masks(self, bits: dict[int, torch.Tensor]) -> None:
        """client_masks.pt: partition id -> packed mask bits, a uint8 tensor (mask-scope 'local')."""
        atomic_torch_save(bits, self.path / "client_masks.pt")

    def load_client_masks(self) -> dict[int, torch.Tensor]:
        """client_masks.pt; one written before the bits were tensors holds numpy arrays of uint8, read by name."""
        bits = read_torch(self.path / "client_masks.pt", allow=_NUMPY_UINT8)
        return {p: torch.as_tensor(b) for p, b in bits.items()}

    def resume(self, key: str) -> dict[str, Any] | None:
        """The last checkpoint that the rows reach (None when fresh), with the rows written after it dropped: the
        one restore step of every run, keyed by its step column ('epoch' or 'round'). A checkpoint past the last
        intact row (that row torn) gives way to the one before it, so the missing rows are redone."""
        rows = self.rows()
        ckpt = self.load_checkpoint(key, upto=_intact(rows, key))
        if ckpt is None and rows:  # starting over: the rows are kept aside, never emptied
            log.warning("%s starts over; its rows are kept as %s", self.path, set_aside(self.rows_file).name)
        self.keep_rows(key, -1 if ckpt is None else ckpt[key], rows)
        if ckpt is not None:
            log.info("resuming %s after %s %d", self.path, key, ckpt[key])
        return ckpt

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """checkpoint.pt, written whole beside the last one before the last one steps aside (checkpoint.prev.pt):
        at every moment one complete checkpoint is on disk."""
        tmp = self.checkpoint_file.with_name(self.checkpoint_file.name + ".tmp")
        write_whole(tmp, torch_bytes(state), self.checkpoint_file)
        if self.checkpoint_file.exists():
            os.replace(self.checkpoint_file, self.previous_file)
        os.replace(tmp, self.checkpoint_file)
        fsync_dir(self.path)

    def load_checkpoint(self, key: str | None = None, upto: int | None = None) -> dict[str, Any] | None:
        """The newest checkpoint that is whole (and at `key` <= `upto`, when given): checkpoint.pt, else the one
        before it (then made the current one, so that the next save keeps it); None when there is none. A
        damaged one is kept as `<name>.bad`; a disk that will not read is an UnreadableError, nothing changed."""
        passed = False
        for path in (self.checkpoint_file, self.previous_file):
            if not path.exists():
                continue
            try:
                checkpoint = _checkpoint(path, key)
            except DamagedRunError as err:
                bad = set_aside(path)
                log.warning("%s cannot be read (%s); it is kept as %s, trying the checkpoint before it", path,
                            err.cause, bad.name)
                passed = True
                continue
            if upto is not None and checkpoint[key] > upto:
                log.warning("%s is at %s %d but %s is whole only up to %s %d; it is kept as %s, trying the "
                            "checkpoint before it", path, key, checkpoint[key], self.rows_file.name, key, upto,
                            set_aside(path).name)
                passed = True
                continue
            if path == self.previous_file:
                os.replace(self.previous_file, self.checkpoint_file)
                fsync_dir(self.path)
                log.warning("resuming %s from its previous checkpoint", self.path)
            return checkpoint
        if passed:
            log.warning("no checkpoint of %s can be resumed from; the run starts over", self.path)
        return None


def _checkpoint(path: Path, key: str | None) -> dict[str, Any]:
    """A checkpoint as save_checkpoint wrote it (a dict, with its step under `key`), else a DamagedRunError."""
    checkpoint = read_torch(path)
    if not isinstance(checkpoint, dict) or (key is not None and not isinstance(checkpoint.get(key), int)):
        raise DamagedRunError(f"{path} is not a checkpoint fedit wrote; delete that run's folder to run it again.",
                              f"no {key or 'dict'} in it")
    return checkpoint


def rows_reach(rows_file: Path, key: str, total: int) -> bool:
    """Whether a rows.jsonl holds every row 0..total, in order."""
    return _intact(read_rows(rows_file), key) >= total


def _intact(rows: list[dict[str, Any]], key: str) -> int:
    """The last step s whose rows 0..s are all there (-1: none): a checkpoint past it would leave rows missing."""
    last = -1
    for row in rows:
        if row.get(key) != last + 1:
            break
        last += 1
    return last


def _numpy_uint8() -> list:
    """numpy's names in a pickled uint8 array (no code runs: the array is rebuilt from its raw bytes)."""
    import numpy as np
    from numpy._core.multiarray import _reconstruct

    return [_reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
            type(np.dtype(np.uint8))]


_NUMPY_UINT8 = _numpy_uint8()


def read_rows(rows_file: Path) -> list[dict[str, Any]]:
    """A rows.jsonl's rows; a torn last line (a write cut short) is left out with a warning (a resume rewrites the
    file without it), any other unreadable line is a DamagedRunError."""
    if not rows_file.exists():
        return []
    with readable(rows_file):
        lines = read_regular(rows_file).decode().splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if n < len(lines):
                raise DamagedRunError(f"line {n} of {rows_file} cannot be read as JSON; delete that run's folder to "
                                      f"run it again.") from None
            log.warning("the last line of %s is cut short (a write interrupted); it is left out", rows_file)
    return rows
