"""Run claims: one owner at a time, a dead owner's claim taken over, a handed-over claim adopted by its token;
another host identity of the same host name judged by its heartbeat alone, on the file system's clock; a
heartbeat that survives passing errors and stops the run once the claim is truly lost."""

import dataclasses
import errno
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from fed_app.runs import claims, procfs


def test_a_live_claim_refuses_a_second_taker_and_release_frees_it(tmp_path):
    first = claims.take(tmp_path)
    assert first is not None and (tmp_path / "CLAIM").exists()
    assert claims.take(tmp_path) is None  # held by a live process (this one)
    assert claims.holder(tmp_path) == first.owner
    assert f"run {tmp_path} is being run by {first.owner.describe()}" in claims.busy_message(tmp_path)
    first.release()
    assert not (tmp_path / "CLAIM").exists()
    again = claims.take(tmp_path)
    assert again is not None and again.token != first.token
    again.release()


def test_the_claim_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    code = ("import sys; from fed_app.runs import claims; c = claims.take(sys.argv[1]); "
            "c._stop.set(); print(c.token)")  # takes it and dies without releasing it
    dead = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    left = json.loads((tmp_path / "CLAIM").read_text())
    assert left["token"] == dead.stdout.strip()
    successor = claims.take(tmp_path)
    assert successor is not None and successor.owner.pid == os.getpid()
    with pytest.raises(claims.ClaimLostError):  # the dead owner's token no longer names the claim
        claims.Claim(tmp_path, claims.Owner(**left), adopted=True).check()
    successor.release()


def test_a_handed_over_claim_is_adopted_by_its_token_and_a_wrong_token_is_one_sentence(tmp_path):
    owner = claims.take(tmp_path)
    adopted = claims.take(tmp_path, owner.token)
    assert adopted.adopted and adopted.owner == owner.owner
    adopted.check()  # its owner (this process) is alive and the token still names the claim
    adopted.release()
    assert (tmp_path / "CLAIM").exists()  # an adopter never removes its owner's claim
    with pytest.raises(claims.ClaimedError, match=r"claim-token='nope' does not name the claim on .*; it is set "
                                                  r"by the commands that claim runs .*; leave it empty\."):
        claims.take(tmp_path, "nope")
    owner.release()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _claim_of(folder, pid, started, host_id, age=0.0, host=None):
    """The claim a command of `host_id` wrote, its heartbeat `age` s old (on this file system's clock)."""
    owner = claims.Owner(host or socket.gethostname(), pid, started, "other-token", time.time(), host_id)
    (folder / "CLAIM").write_text(json.dumps(dataclasses.asdict(owner)))
    beat = (folder / "CLAIM").stat().st_mtime - age
    os.utime(folder / "CLAIM", (beat, beat))
    return owner


def _other_identities():
    """This host name with another boot id, and with another pid namespace: another VM clone, another container."""
    host, boot, namespace = procfs.host_identity().split(" ")
    return [f"{host} 00000000-0000-4000-8000-000000000000 {namespace}", f"{host} {boot} pid:[1]"]


@pytest.mark.parametrize("identity", range(2), ids=["another-boot", "another-pid-namespace"])
@pytest.mark.parametrize("pid", ["dead-here", "another-process-here"])
def test_a_live_claim_of_another_host_identity_with_this_host_name_is_never_taken_over(tmp_path, identity, pid):
    pid = _dead_pid() if pid == "dead-here" else os.getpid()  # os.getpid() with another start time: not us
    held = _claim_of(tmp_path, pid, "12345", _other_identities()[identity])
    assert claims.take(tmp_path) is None and claims.holder(tmp_path) == held  # its heartbeat is fresh
    assert json.loads((tmp_path / "CLAIM").read_text())["token"] == "other-token"


@pytest.mark.parametrize("identity", range(2), ids=["another-boot", "another-pid-namespace"])
def test_a_silent_claim_of_another_host_identity_is_taken_over_even_if_its_pid_is_alive_here(tmp_path, identity):
    _claim_of(tmp_path, os.getpid(), procfs.start_time(os.getpid()), _other_identities()[identity],
              age=2 * claims.TIMEOUT_S)  # pid and start time match this very process: a coincidence of pid spaces
    taken = claims.take(tmp_path)
    assert taken is not None and claims.holder(tmp_path) == taken.owner
    taken.release()


@pytest.mark.parametrize("skew", [3600.0, -3600.0])
def test_freshness_is_judged_by_the_file_systems_clock_not_a_skewed_local_one(tmp_path, monkeypatch, skew):
    real = time.time
    stale = skew < 0  # with the local clock an hour behind, a silent claim; an hour ahead, a live one
    held = _claim_of(tmp_path, 4321, "12345", "another-machine 00000000-0000-4000-8000-000000000000 pid:[1]",
                     age=2 * claims.TIMEOUT_S if stale else 0, host="another-machine")
    monkeypatch.setattr(time, "time", lambda: real() + skew)
    taken = claims.take(tmp_path)
    if stale:
        assert taken is not None and claims.holder(tmp_path) == taken.owner
        taken.release()
    else:
        assert taken is None and claims.holder(tmp_path) == held


def _beating(folder, heartbeat=0.02):
    """A claim of this process on `folder` beating every `heartbeat` s, its last beat long ago."""
    owner = claims.Owner.me()
    (folder / "CLAIM").write_text(json.dumps(dataclasses.asdict(owner)))
    os.utime(folder / "CLAIM", (1_000_000, 1_000_000))
    return claims.Claim(folder, owner, heartbeat=heartbeat)


def _failing_utime(monkeypatch, file, times):
    """A touch (os.utime without times) failing on `file` `times` times, as a file server's hiccup would."""
    failures, real = [], os.utime

    def utime(path, *args, **kwargs):
        if str(path) == str(file) and not args and not kwargs and len(failures) < times:
            failures.append(path)
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real(path, *args, **kwargs)
    monkeypatch.setattr(os, "utime", utime)
    return failures


def _checked_until_lost(claim, within=10.0):
    """Check the claim (as a run does before each row) until it is found lost, for up to `within` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        claim.check()
        time.sleep(0.01)


def test_a_heartbeat_that_meets_an_error_keeps_beating(tmp_path, monkeypatch):
    failures = _failing_utime(monkeypatch, tmp_path / "CLAIM", times=1)
    claim = _beating(tmp_path)
    deadline = time.monotonic() + 10
    while (tmp_path / "CLAIM").stat().st_mtime == 1_000_000 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(failures) == 1 and (tmp_path / "CLAIM").stat().st_mtime > 1_000_000  # beat after the error
    claim.check()  # not lost
    claim.release()
    assert not (tmp_path / "CLAIM").exists()


def test_a_heartbeat_that_cannot_write_for_the_staleness_window_stops_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(claims, "TIMEOUT_S", 0.3)
    _failing_utime(monkeypatch, tmp_path / "CLAIM", times=10**9)
    claim = _beating(tmp_path)
    with pytest.raises(claims.ClaimLostError, match=r"^no heartbeat could be written on .*CLAIM for 0.3 s "
                                                    r"\(.*Input/output error.*\); this run stops, since another "
                                                    r"runner may take it over now$"):
        _checked_until_lost(claim)
    claim.release()


def test_a_claim_that_names_another_owner_stops_the_run_naming_that_owner(tmp_path):
    claim = _beating(tmp_path)
    successor = _claim_of(tmp_path, os.getpid(), procfs.start_time(os.getpid()), procfs.host_identity())
    time.sleep(0.1)  # a few beats: the heartbeat must leave the successor's claim alone
    with pytest.raises(claims.ClaimLostError, match=rf"^the claim on {tmp_path} now names "
                                                    rf"{successor.describe()}; this run stops here so that only "
                                                    rf"one command runs it$"):
        _checked_until_lost(claim)
    claim.release()
    assert claims.read_owner(tmp_path / "CLAIM") == successor  # the successor's claim is left alone


def test_an_adopted_claim_whose_command_is_alive_but_silent_stops(tmp_path):
    owner = claims.take(tmp_path)
    beat = time.time() - 2 * claims.TIMEOUT_S
    os.utime(tmp_path / "CLAIM", (beat, beat))  # its heartbeat stuck (an NFS mount hung), its process alive
    with pytest.raises(claims.ClaimLostError, match=rf"^the claim on {tmp_path} had no heartbeat for 1[12]\d s "
                                                    r"\(its command: .*\); stopping so that another command can "
                                                    r"take the run over$"):
        claims.take(tmp_path, owner.token).check()
    owner.release()


def test_a_runner_in_another_pid_namespace_of_this_host_keeps_its_live_claim(tmp_path):
    code = ("import sys; from fed_app.runs import claims; c = claims.take(sys.argv[1]); print(c.token, flush=True); "
            "sys.stdin.read(); c.release()")  # holds its claim, beating, until told to go
    other = subprocess.Popen(["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc",
                              sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    token = other.stdout.readline().strip()
    if not token:
        pytest.skip(f"no unprivileged pid namespace here: {other.communicate('')[1].strip()[-200:]}")
    try:
        held = claims.read_owner(tmp_path / "CLAIM")
        assert held.token == token and held.host == socket.gethostname() and not held.here()
        assert claims.take(tmp_path) is None and claims.holder(tmp_path) == held  # its pid means nothing here
    finally:
        other.communicate("")
    assert not (tmp_path / "CLAIM").exists()  # released by its owner, not taken


def test_a_claim_released_before_anything_was_written_leaves_no_folder_it_made_at_any_level(tmp_path):
    (tmp_path / "results").mkdir()
    keep = tmp_path / "results" / "kept.txt"
    keep.write_text("the user's")
    claim = claims.take(tmp_path / "results" / "federated" / "abc123")  # make run's folder: results/federated/<id>
    claim.release()
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["kept.txt"]  # no empty federated/
