"""procfs reads what /proc says of a process: its CPU seconds, start time, command line and FLWR_HOME; and
whose pids this process sees (its host identity)."""

import os
import socket
import subprocess
import sys
import time

import pytest

from fed_app.runs import procfs


def test_cpu_seconds_match_what_the_process_counts_itself():
    child = subprocess.Popen([sys.executable, "-c", "import time, sys\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.5: pass\nprint(time.process_time(), flush=True)\n"
                              "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    own = float(child.stdout.readline())  # the child's own count, read while it still lives
    assert abs(procfs.cpu_seconds(child.pid) - own) < 0.05
    child.communicate("")
    assert procfs.cpu_seconds(child.pid) is None and not procfs.alive(child.pid)


def test_start_time_command_line_and_flwr_home_name_one_process(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", "flwr-simulation"],
                             stdin=subprocess.PIPE, env={**os.environ, "FLWR_HOME": str(tmp_path)})
    try:
        time.sleep(0.2)
        assert procfs.alive(child.pid) and child.pid in procfs.pids()
        assert procfs.command_line(child.pid).endswith("flwr-simulation")
        assert procfs.flwr_home(child.pid) == tmp_path and procfs.flwr_home(os.getpid()) != tmp_path
        assert procfs.start_time(child.pid) not in ("", procfs.start_time(os.getpid()))
        assert os.getpid() not in procfs.pids() and os.getpid() in procfs.pids(include_own=True)
    finally:
        child.communicate(b"")
    assert procfs.start_time(child.pid) == "" and procfs.command_line(child.pid) == ""


def test_the_host_identity_tells_another_pid_namespace_of_this_host_name_and_boot_apart():
    code = "from fed_app.runs import procfs; print(procfs.host_identity())"
    inside = subprocess.run(["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc",
                             sys.executable, "-c", code], capture_output=True, text=True)
    if inside.returncode != 0:
        pytest.skip(f"no unprivileged pid namespace here: {inside.stderr.strip()[-200:]}")
    host, boot, namespace = procfs.host_identity().split(" ")
    assert host == socket.gethostname() and len(boot) == 36 and namespace.startswith("pid:[")
    theirs = inside.stdout.strip().split(" ")
    assert theirs[:2] == [host, boot] and theirs[2] != namespace  # a container's pids: not ours to judge
