"""The same app on Flower's deployment engine: a real flower-superlink and flower-supernodes on localhost; the
leftovers of a SIGKILLed command reaped, and only this host identity's."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fed_app.config import ConfigError, RunConfig, parse_overrides
from fed_app.local.local_federation import LocalFederation, free_port, reap_orphans, run_config_arg
from fed_app.runs import procfs

from ...conftest import TINY


@pytest.mark.slow
def test_two_rounds_on_a_superlink_with_two_supernodes(tmp_path):
    cfg = RunConfig.from_run_config({**TINY, "synthetic-train-size": 700, "val-size": 100, "num-clients": 2,
                                     "fraction-train": 1.0, "num-rounds": 2, "eval-every": 1,
                                     "run-dir": str(tmp_path / "run")})
    port = free_port()
    with LocalFederation(tmp_path / "flwr") as fed:
        fed.home.mkdir(parents=True)
        (fed.home / "config.toml").write_text(
            f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
        bin_dir = Path(fed.command(cfg, 1)[0]).parent
        logs = open(tmp_path / "processes.log", "w")
        subprocess.Popen([bin_dir / "flower-superlink", "--insecure", "--port", str(port)], env=fed.env,
                         stdout=logs, stderr=logs)
        time.sleep(2)
        for pid in range(2):
            subprocess.Popen([bin_dir / "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                              "--host", "127.0.0.1", "--port", str(free_port()),
                              "--node-config", f"partition-id={pid} num-partitions=2"],
                             env=fed.env, stdout=logs, stderr=logs)
        fed.run(cfg, superlink="deploy", timeout=300)
    rows = [json.loads(line) for line in (tmp_path / "run" / "rows.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["clients"] == 2 for r in rows[1:])
    assert "test_accuracy" in rows[-1] and (tmp_path / "run" / "DONE").exists()


def test_reap_orphans_leaves_alone_what_another_host_identity_of_this_host_name_made(tmp_path):
    code = ("import sys; from fed_app.local.local_federation import LocalFederation; "
            "h = LocalFederation(sys.argv[1]).home; h.mkdir(); print(h.name)")
    made = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    mine = tmp_path / made.stdout.strip()  # made here by a command that is gone (SIGKILLed)
    host, boot, _ = procfs.host_identity().split(" ")
    other = hashlib.sha256(f"{host} {boot} pid:[1]".encode()).hexdigest()[:12]  # a container of this host name
    theirs = tmp_path / f"{mine.name.rsplit('-', 1)[0]}-{other}"  # its runner had the same pid in its own space
    theirs.mkdir()
    # processes of both, visible here as a container's are from its host: theirs alive and not ours to kill
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    procs = [subprocess.Popen(sleep, env={**os.environ, "FLWR_HOME": str(home)}) for home in (mine, theirs)]
    try:
        assert reap_orphans(tmp_path) == [procs[0].pid]
        assert procs[1].poll() is None and theirs.is_dir() and not mine.exists()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("root", ["/data/o'brien", 'a "quoted" dir', "back\\slash", "tab\there", "ünïcode", "/a b",
                                  "new\nline", ""])
def test_every_string_reaches_flower_as_it_was_given(root):
    cfg = RunConfig.from_run_config({**TINY, "data-root": root})
    assert RunConfig.from_run_config(parse_overrides(run_config_arg(cfg))) == cfg  # Flower's own parser


def test_a_string_flower_cannot_carry_is_one_sentence():
    with pytest.raises(ConfigError, match=r"run-config data-root=.* holds both quote characters"):
        run_config_arg(RunConfig.from_run_config({**TINY, "data-root": "it's \"here\""}))
