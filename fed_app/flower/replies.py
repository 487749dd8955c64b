"""What the server accepts from a client's reply, checked before it counts: a payload file only where the server
said to write it, tensors only of the model's names, shapes and dtypes, values only finite. A reply that fails is a
failed client (fed_app/flower/federation.py: resent up to max-retries, then the round fails in one sentence); it
is never averaged, clipped or written. The client side reads what the server sent with payload.take."""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from torch import Tensor

from fed_app.flower.payload import FILE_SUFFIX, Key, decode


NONFINITE = "holds NaN or Inf"  # a refusal's words for values a blown-up training gives (server_app: DIVERGED)


class BadReplyError(ValueError):
    """A client's reply that cannot count: a file it may not name, tensors that do not fit the model, non-finite
    values. The client is failed for the round (fed_app/flower/federation.py: resent, then the round fails)."""


def reply_tag(request: RecordDict) -> str:
    """The name the server issued for the files of the reply to `request` ('' when it issued none)."""
    return str(request[Key.REPLY][Key.TAG]) if Key.REPLY in request else ""


def take_reply(content: RecordDict, key: str, folder: Path | None, tag: str) -> dict[str, Tensor]:
    """The tensors under `key` of a client's reply, as `take` gives them, but trusting nothing the reply says: a
    file reference only with transport='files' (`folder`), only for the name the request issued (`tag`), inside
    that folder, a regular file of this user's and not a link (a FIFO or a link to the run's checkpoint is
    refused, never read or deleted); then deleted. Raises BadReplyError."""
    if key in content:
        if not isinstance(content[key], ArrayRecord):
            raise BadReplyError(f"its {key!r} is a {type(content[key]).__name__}, not an ArrayRecord")
        try:
            return decode(content[key])
        except Exception as err:  # noqa: BLE001 - bytes that are no array (numpy's reader raises what it raises)
            raise BadReplyError(f"its {key!r} cannot be read as arrays ({type(err).__name__})") from None
    if key + FILE_SUFFIX not in content:
        raise BadReplyError(f"it carries no {key!r}")
    named = str(content[key + FILE_SUFFIX].get("path", ""))
    if folder is None or not tag or named != str(folder / f"{key}-{tag}.pt"):
        raise BadReplyError(f"it names the file {named!r}, which is not the one the server issued for it")
    path = Path(named)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise BadReplyError(f"the file it names, {named!r}, is not there") from None
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or path.parent.resolve() != folder.resolve():
        raise BadReplyError(f"the file it names, {named!r}, is not a regular file of this user's in {folder}")
    try:
        return torch.load(path, weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - whatever a crafted file makes the reader raise, it does not count
        raise BadReplyError(f"the file it names cannot be read as tensors ({type(err).__name__})") from None
    finally:
        path.unlink(missing_ok=True)


def check_metrics(metrics: object, pid: int, examples: int) -> None:
    """Raise BadReplyError unless a train reply's metrics name partition `pid`, its `examples` training images (as
    its node reported them at discovery), a finite train loss, and flags of 0 or 1."""
    if not isinstance(metrics, MetricRecord) or metrics.get(Key.PARTITION_ID) != pid:
        raise BadReplyError(f"its metrics do not name partition {pid}")
    if metrics.get(Key.NUM_EXAMPLES) != examples:
        raise BadReplyError(f"it trained on {metrics.get(Key.NUM_EXAMPLES)!r} images where its node reported "
                            f"{examples} (the federation's data changed mid-run?)")
    loss = metrics.get(Key.TRAIN_LOSS)
    if not isinstance(loss, (int, float)) or isinstance(loss, bool):
        raise BadReplyError(f"its train loss is {loss!r}, not a number")
    if not math.isfinite(loss):
        raise BadReplyError(f"its train loss {NONFINITE}")
    for flag in (Key.ATTACKER, Key.CLIPPED):
        if flag in metrics and metrics[flag] not in (0, 1):
            raise BadReplyError(f"its {flag!r} is {metrics[flag]!r}, not 0 or 1")


def check_evaluation(pid: int, reply) -> None:
    """Raise BadReplyError unless an evaluation reply holds a positive image count, a finite loss and an accuracy
    in [0, 1]: the round's client metrics are their example-weighted means."""
    metrics = reply.content.get(Key.METRICS)
    if not isinstance(metrics, MetricRecord) or metrics.get(Key.PARTITION_ID) != pid:
        raise BadReplyError(f"its metrics do not name partition {pid}")
    count, loss, accuracy = (metrics.get(k) for k in (Key.NUM_EXAMPLES, "loss", "accuracy"))
    if not (isinstance(count, int) and count > 0 and isinstance(loss, (int, float)) and math.isfinite(loss)
            and isinstance(accuracy, (int, float)) and 0 <= accuracy <= 1):
        raise BadReplyError(f"its evaluation ({count!r} images, loss {loss!r}, accuracy {accuracy!r}) is not "
                            f"a positive count, a finite loss and an accuracy in [0, 1]")


def query_check(key: str, expected: dict[str, tuple[torch.Size, torch.dtype]]):
    """A check (for federation.exchange) of a step-0 or calibration reply: its tensors under `key`, inside the
    message (a query's reply names no file), of exactly the expected names, shapes and dtypes, every value
    finite."""
    def check(pid: int, reply) -> None:
        check_tensors(take_reply(reply.content, key, None, ""), expected)

    return check


def check_tensors(tensors: object, expected: dict[str, tuple[torch.Size, torch.dtype]]) -> None:
    """Raise BadReplyError unless `tensors` holds exactly the expected names, each of its shape and dtype, every
    value finite (a NaN norm clips nothing and a NaN mean poisons the model before any guard sees it)."""
    if not isinstance(tensors, dict) or list(tensors) != list(expected):
        names = list(tensors)[:4] if isinstance(tensors, dict) else type(tensors).__name__
        raise BadReplyError(f"it sends tensors {names}, not {list(expected)[:4]}")
    for name, (shape, dtype) in expected.items():
        value = tensors[name]
        if not isinstance(value, Tensor) or value.shape != shape or value.dtype != dtype:
            found = (tuple(value.shape), value.dtype) if isinstance(value, Tensor) else type(value).__name__
            raise BadReplyError(f"its {name!r} is {found}, not {(tuple(shape), dtype)}")
        if not bool(torch.isfinite(value).all()):
            raise BadReplyError(f"its {name!r} {NONFINITE}")
