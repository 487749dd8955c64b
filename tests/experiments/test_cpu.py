"""CpuSampler: the CPU seconds of a federation's processes by kind, between two moments, against what each
process counts itself."""

import os
import subprocess
import sys
import time

import pytest

from experiments.cpu import CLIENTS, ENGINE, OTHER, SUPERLINK, CpuSampler, kind_of

# burns `s` CPU-seconds, says when it started and ended (epoch s) and the CPU it spent in between, then waits
BURN = ("import sys, time\nstart, t = time.time(), time.process_time()\nwhile time.process_time() - t < {s}: pass\n"
        "print(start, time.time(), time.process_time() - t, flush=True)\nsys.stdin.read()\n")


def test_kinds_follow_the_command_lines_of_flower_and_ray_processes():
    assert kind_of("ray::ClientAppActor.run") == CLIENTS and kind_of("ray::ClientAppActor") == CLIENTS
    assert kind_of("/v/bin/python /v/bin/flwr-simulation --runtime-api-address 1") == ENGINE
    assert kind_of("/v/bin/python /v/bin/flower-superlink --insecure") == SUPERLINK
    assert kind_of("ray::IDLE") == OTHER and kind_of("/v/bin/flwr run .") == OTHER


def test_cpu_between_two_moments_is_what_the_processes_spent(tmp_path):
    env = {**os.environ, "FLWR_HOME": str(tmp_path)}
    outside = {**os.environ, "FLWR_HOME": str(tmp_path / "other")}  # another federation: not counted
    with CpuSampler(tmp_path, interval=0.05) as cpu:
        procs = [subprocess.Popen([sys.executable, "-c", BURN.format(s=s), kind], env=e, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
                 for s, kind, e in ((0.6, "flwr-simulation", env), (0.3, "ClientAppActor", env),
                                    (0.4, "ClientAppActor", outside))]
        reports = [[float(v) for v in p.stdout.readline().split()] for p in procs]
        time.sleep(0.3)  # sampled after the burns ended
        for p in procs:
            p.communicate("")
        time.sleep(0.2)  # and after they exited: their last readings stay
    start, end = min(r[0] for r in reports), max(r[1] for r in reports) + 0.1
    spent = cpu.between(start, end)
    assert spent[ENGINE] == pytest.approx(reports[0][2], abs=0.08)
    assert spent[CLIENTS] == pytest.approx(reports[1][2], abs=0.08)
    after = cpu.between(end, time.time() - 0.1)  # idle, then exited (a few ms of shut-down): the readings stay
    assert all(v == pytest.approx(0.0, abs=0.03) for v in after.values())
    assert spent[SUPERLINK] == 0.0
    halfway = cpu.between(start, (reports[0][0] + reports[0][1]) / 2)[ENGINE]
    assert 0.1 < halfway < 0.5  # interpolated inside the burn, not all or nothing
    with pytest.raises(ValueError, match="no CPU samples"):
        cpu.between(start - 60, end)
