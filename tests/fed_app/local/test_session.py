"""Sessions: one Flower simulation runs a command's runs in turn, each ending as it would alone; a failed run
ends the session with its sentence and the next run starts a new one; the ServerApp stops waiting when told
to or when the command is gone."""

import json
import subprocess
import sys

import pytest
import torch

from fed_app.config import RunConfig
from fed_app.local.local_federation import FlowerRunError
from fed_app.local.session import SessionFolder

from ...conftest import fl_cfg as _cfg, run_in_process

TIMING = {"wall_time", "round_time"}


def _rows(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "rows.jsonl").read_text().splitlines()]


def test_the_session_folder_hands_over_runs_and_ends_on_stop_or_when_the_command_is_gone(tmp_path):
    folder = SessionFolder.create(tmp_path / "session")
    cfg = RunConfig(seed=7, run_dir=str(tmp_path / "run"))
    folder.submit(1, cfg, claim_token="abc")
    assert folder.next_run(1) == (cfg, "abc") and folder.result(1) is None
    folder.finish(1, "run-config lr=-1 must be positive; give a learning rate above 0.")
    assert folder.result(1) == {"error": "run-config lr=-1 must be positive; give a learning rate above 0."}
    folder.stop()
    assert folder.next_run(2) is None  # told to stop while it waits
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = SessionFolder.create(tmp_path / "orphan")
    (orphan.folder / "owner.json").write_text(json.dumps({"pid": int(gone.stdout), "started": "1"}))
    assert not orphan.owner_alive() and orphan.next_run(1) is None  # the command died: nobody will submit
    orphan.submit(1, cfg)
    fresh = SessionFolder.create(tmp_path / "orphan")  # a new session in the same place starts empty, owned here
    assert fresh.owner_alive() and not (fresh.folder / "run-1.json").exists()


@pytest.mark.slow
def test_runs_in_one_session_end_as_alone_and_a_failed_run_ends_the_session(tmp_path, flower_session):
    first = _cfg(tmp_path, "first", seed=1)
    # the second run also takes client-side adaptive DP and label-flipping attackers through the session
    second = _cfg(tmp_path, "second", seed=2, partition="noniid", dp="client-adaptive", attack="label-flip",
                  **{"classes-per-client": 20, "attack-fraction": 0.2, "dp-noise-multiplier": 0.3,
                     "dp-clipping-norm": 0.5, "dp-clipped-count-stddev": 1.0})
    refused = _cfg(tmp_path, "refused", seed=3)
    after = _cfg(tmp_path, "after", seed=4)
    alone = second.replace(run_dir=str(tmp_path / "alone"))
    session = flower_session  # the suite's session: it may have served other tests' runs already
    session.run(first)
    starts = session.starts
    log = session.run(second)
    assert session.starts == starts and "round 4/4" in log  # the same `flwr run` for both, each run's own log
    with pytest.raises(FlowerRunError, match="claim-token='not-a-claim' does not name the claim"):
        session.run(refused, claim_token="not-a-claim")  # the ServerApp's sentence; the session ends with it
    session.run(after)
    assert session.starts == starts + 1
    run_in_process(alone)
    for name in ("first", "second", "after"):
        assert (tmp_path / name / "DONE").exists()
        assert all(r["task_builds"] == 1 for r in _rows(tmp_path / name)[1:])  # each run's task built once
    assert _rows(tmp_path / "second") == _rows(tmp_path / "alone")  # as if the run had been alone
    assert all({"epsilon", "clipping_norm", "attackers"} <= set(r) for r in _rows(tmp_path / "second")[1:])
    a = torch.load(tmp_path / "second" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "alone" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "refused" / "rows.jsonl").exists()
