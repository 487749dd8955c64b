"""Run claims: one owner at a time, a dead owner's claim taken over, a handed-over claim adopted by its token."""

import json
import os
import subprocess
import sys

import pytest

from fed_app.runs import claims


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
