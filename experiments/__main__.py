"""Command line: `python -m experiments bench fisher [--model ...]`."""

from __future__ import annotations

import argparse
import logging

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmarks; print a Markdown table and ratios")
    bench.add_argument("what", choices=["fisher"])
    bench.add_argument("--model", default=None, help="default: vit-small-dino on CUDA, vit-tiny-test on CPU")
    bench.add_argument("--samples", type=int, default=None, help="default: 450 (one client's shard) on CUDA, 128 on CPU")
    bench.add_argument("--chunk", type=int, default=32)
    bench.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from experiments.bench import bench_fisher, print_fisher

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = args.model or ("vit-small-dino" if device.type == "cuda" else "vit-tiny-test")
    samples = args.samples or (450 if device.type == "cuda" else 128)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    rows = bench_fisher(model, samples, args.chunk, args.repeats, device)
    print_fisher(rows, f"bench fisher: {model}, {samples} samples, chunk {args.chunk}, {name}, fp32")


if __name__ == "__main__":
    main()
