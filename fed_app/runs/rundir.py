"""A run's directory: config.json, append-only rows.jsonl, atomic checkpoint.pt (and the one before it), DONE or
DIVERGED marker.

A damaged folder recovers or says why not: a checkpoint that cannot be read (a copy cut short) gives way to the
one before it, which is kept until the next is safely written; a torn last line of rows.jsonl (a write cut short)
is dropped with a warning; a write that finds the disk full stops the run with one sentence, its files as they
were, and the same command resumes once there is room."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fed_app.config import NOT_RESULTS, ConfigError, RunConfig, to_kebab
from fed_app.errors import UserError

log = logging.getLogger(__name__)

FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no room: the disk, the user's quota, the file-size limit


class DiskFullError(UserError, OSError):
    """A run's file could not be written for want of room; the message says what is kept and how to go on."""


class DamagedRunError(UserError, RuntimeError):
    """A run's files cannot be read in a way fedit can recover from; the message names the file."""


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

    def mark_diverged(self, reason: str) -> None:
        atomic_write_bytes(self.diverged_file, reason.encode())

    def append_row(self, row: dict[str, Any]) -> None:
        """One line, on disk (fsync); a write that fails part-way is cut back off, so no half row is left."""
        data = (json.dumps(row) + "\n").encode()
        with _room_for(self.rows_file):
            fd = os.open(self.rows_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
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

    def rows(self) -> list[dict[str, Any]]:
        return read_rows(self.rows_file)

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
        """checkpoint.pt, written whole beside the last one before the last one steps aside (checkpoint.prev.pt):
        at every moment one complete checkpoint is on disk."""
        tmp = self.checkpoint_file.with_name(self.checkpoint_file.name + ".tmp")
        _write_whole(tmp, _torch_bytes(state), self.checkpoint_file)
        if self.checkpoint_file.exists():
            os.replace(self.checkpoint_file, self.previous_file)
        os.replace(tmp, self.checkpoint_file)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The newest checkpoint that can be read: checkpoint.pt, else the one before it (then made the current
        one, so that the next save keeps it); None when there is none."""
        for path in (self.checkpoint_file, self.previous_file):
            if not path.exists():
                continue
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=False)
            except Exception as err:  # a file cut short: torch's zip reader, pickle, EOF... name the cause
                log.warning("%s cannot be read (%s: %s); trying the checkpoint before it", path,
                            type(err).__name__, str(err).splitlines()[0] if str(err) else "")
                continue
            if path == self.previous_file:
                os.replace(self.previous_file, self.checkpoint_file)
                log.warning("resuming %s from its previous checkpoint", self.path)
            return checkpoint
        if self.checkpoint_file.exists() or self.previous_file.exists():
            log.warning("no checkpoint of %s can be read; the run starts over", self.path)
        return None


def read_rows(rows_file: Path) -> list[dict[str, Any]]:
    """A rows.jsonl's rows; a torn last line (a write cut short) is left out with a warning (a resume rewrites the
    file without it), any other unreadable line is a DamagedRunError."""
    if not rows_file.exists():
        return []
    lines = rows_file.read_text().splitlines()
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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    _write_whole(tmp, data, path)
    os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write_bytes(path, _torch_bytes(obj))


def _torch_bytes(obj: Any) -> memoryview:
    """torch.save's bytes, written by Python afterwards: torch's own file writer turns a full disk into a bare
    RuntimeError ('unexpected pos'), Python's into an OSError with its errno."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


def _write_whole(tmp: Path, data: bytes | memoryview, path: Path) -> None:
    """`data` in `tmp`, on disk (fsync), for `path`: a full disk is a DiskFullError and no `tmp` is left."""
    with _room_for(path, tmp), open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _room_for(path: Path, tmp: Path | None = None) -> Iterator[None]:
    """Writing `path` (through `tmp`): a disk full, a quota or a file-size limit reached is one sentence, with the
    half-written temporary file removed and `path` as it was."""
    try:
        yield
    except OSError as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if err.errno not in FULL:
            raise
        raise DiskFullError(f"{path} could not be written ({os.strerror(err.errno)}); the run stops here with its "
                            f"files as they were and its last checkpoint kept: make room on that disk (or raise "
                            f"the file-size limit) and run the same command to resume.") from None
