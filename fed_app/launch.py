"""`make run`: one federated run on a private local Flower simulation (results/.flwr), resumed when rerun.

`python -m fed_app.launch --run-config "..."` checks the config, loads the data and builds the model once
(the preflight: a missing dataset or weights file is one sentence, not a traceback inside the ServerApp),
starts the simulation, streams its log and stops every process it started, also when SIGTERM or SIGHUP
stops it. The run is claimed first (fed_app/runs/claims.py), so a second command on a live run is refused."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from fed_app.runs import claims
from fed_app.config import RunConfig
from fed_app.local.local_federation import FlowerRunError, LocalFederation, client_gpus

log = logging.getLogger(__name__)


def preflight(cfg: RunConfig) -> None:
    """Load the data and build the model once here, so a missing dataset or weights file is one sentence
    before Flower starts, not a traceback inside the ServerApp."""
    from fed_app.task.data import CIFAR, check_image_folder, read_cifar
    from fed_app.task.model import build_model

    if cfg.dataset in CIFAR:  # read and dropped: this process keeps no copy of the data
        read_cifar(cfg.dataset, cfg.data_root, cfg.download)
    elif cfg.dataset == "imagefolder":
        check_image_folder(cfg.data_root)
    build_model(cfg, 100)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from fed_app.config import parse_overrides
    from fed_app.runs.rundir import RunDir
    from fed_app.runs.run_loop import DivergedError, diverged_message

    parser = argparse.ArgumentParser(
        prog="python -m fed_app.launch",
        description="Run the Flower app on a private local simulation (results/.flwr), then stop it.")
    parser.add_argument("--run-config", default="", help="e.g. \"local-steps=8 partition='noniid'\"")
    parser.add_argument("--num-supernodes", type=int, default=None, help="default: num-clients")
    parser.add_argument("--cpus", type=int, default=1, help="CPU cores per client (client-resources-num-cpus)")
    parser.add_argument("--gpus", type=float, default=None,
                        help="GPU fraction per client; default 0.1 with CUDA (10 clients share the GPU), else 0")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = RunConfig.from_run_config(parse_overrides(args.run_config))
    run_dir = RunDir.for_config(cfg, group="federated")
    cfg = cfg.replace(run_dir=str(run_dir.path))  # absolute for the SuperLink
    claim = claims.take(run_dir.path)  # before Flower starts: one federation per run, ever
    if claim is None:
        raise claims.ClaimedError(claims.busy_message(run_dir.path))
    with claim:
        preflight(cfg)
        gpus = client_gpus(args.gpus)
        with LocalFederation(Path("results") / ".flwr") as sim:  # SIGTERM/SIGHUP/Ctrl-C: stopped on the way out
            proc = sim.popen(cfg, args.num_supernodes or cfg.num_clients, cpus=args.cpus, gpus=gpus,
                             claim_token=claim.token)  # the ServerApp adopts this claim and stops if it is lost
            for line in proc.stdout:  # stream Flower's log as it comes
                sys.stdout.write(line)
            proc.wait()
    if run_dir.diverged:
        raise DivergedError(diverged_message(run_dir))
    if not run_dir.done:
        raise FlowerRunError("the Flower run did not finish; see the log above. Rerun the same command to resume.")
    log.info("done: %s", cfg.run_dir)


if __name__ == "__main__":
    from fed_app.cli import exit_on_user_error

    exit_on_user_error(main)
