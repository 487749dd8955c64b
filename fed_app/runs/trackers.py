"""Live experiment tracking beside rows.jsonl (which stays the source of truth that reports read):
`tracker='tensorboard'` writes each row's metrics and the run config (as hyperparameters) to TensorBoard
event files in `<run-dir>/tensorboard`; `tracker='wandb'` logs to Weights & Biases, one W&B run per fedit
run (id = the run's folder name), grouped by manifest, offline unless WANDB_API_KEY is set (`wandb sync
<run-dir>/wandb/offline-run-*` later). A resumed run continues the same tracker run and logs no step twice:
it first logs the rows of rows.jsonl that the backend does not hold yet, then each new row; the rows a resume
recomputes (equal to the ones held from before the stop) are not logged again."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fed_app.config import RunConfig
from fed_app.runs.hooks import RunHook


class Tracker(RunHook):
    """Logs each row once per step, in step order (a hook on the run loop). `last` is the last step the backend
    holds durably; a run that starts or resumes first catches up on the rows after it (`catch_up`)."""

    last = -1

    def __init__(self, key: str):
        self.key = key

    def catch_up(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.log(row)

    def log(self, row: dict[str, Any]) -> None:
        step = int(row[self.key])
        if step <= self.last:
            return  # the backend holds it already (a resumed run recomputes the same numbers)
        metrics = {k: float(v) for k, v in row.items() if k != self.key and isinstance(v, (int, float))
                   and not isinstance(v, bool)}
        self._write(step, metrics)
        self.last = step

    def _write(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoard(Tracker):
    """Events flushed after each row; the last step flushed is kept in `<run-dir>/tensorboard/last_step`."""

    def __init__(self, cfg: RunConfig, run_dir: Path, key: str):
        super().__init__(key)
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        folder = Path(run_dir) / "tensorboard"
        self.step_file = folder / "last_step"
        self.last = int(self.step_file.read_text()) if self.step_file.exists() else -1
        self.writer = SummaryWriter(log_dir=str(folder))
        if self.last < 0:  # a fresh run: the config once, as hyperparameters of this same run
            values = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
                      for k, v in cfg.to_dict().items()}
            for summary in hparams(values, {"val_accuracy": 0.0, "test_accuracy": 0.0}):
                self.writer.file_writer.add_summary(summary)

    def _write(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()
        self.step_file.write_text(str(step))

    def close(self) -> None:
        self.writer.close()


class WandB(Tracker):
    """One W&B run per fedit run. Offline, the steps held are read back from the earlier sessions' run files
    (W&B buffers them: a SIGKILLed session may have kept none); online, from the resumed run's step."""

    def __init__(self, cfg: RunConfig, run_dir: Path, key: str):
        super().__init__(key)
        import wandb

        run_dir = Path(run_dir)
        online = bool(os.environ.get("WANDB_API_KEY"))
        held = [step for f in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
                for step, _ in wandb_history(f)]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fedit"), id=run_dir.name, name=run_dir.name,
                              group=run_dir.parent.name, config=cfg.to_dict(), dir=str(run_dir),
                              mode="online" if online else "offline", resume="allow",
                              settings=wandb.Settings(silent=True, console="off"))
        self.last = self.run.step - 1 if online else max(held, default=-1)

    def _write(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


def wandb_history(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(step, metrics) of each history record in a W&B run file."""
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            yield record.history.step.num, {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                            for i in record.history.item}


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of a W&B run file: a 7-byte header, then 32 KiB blocks of (crc32, length, type) chunks; a
    record (wandb_internal_pb2.Record) is one full chunk, or a first, middles and a last."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, pending = Path(path).read_bytes(), 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding: the end of what was written
            return
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def open_tracker(cfg: RunConfig, run_dir: Path, key: str) -> Tracker:
    if cfg.tracker == "tensorboard":
        return TensorBoard(cfg, run_dir, key)
    if cfg.tracker == "wandb":
        return WandB(cfg, run_dir, key)
    return Tracker(key)
