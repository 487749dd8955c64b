"""`bench data`: the on-device input pipeline (uint8 images, index batches, transform) against torchvision's DataLoader."""

from __future__ import annotations

import time

import torch

from experiments.bench.timing import measure, print_table, sync
from fed_app.config import RunConfig


def bench_data(cfg: RunConfig, batches: int) -> list[dict]:
    """Device-side batch preparation (index, resize, normalize, augment) vs the training step's consumption."""
    from fed_app.task.batches import BatchTransform
    from fed_app.task.data import load_dataset
    from fed_app.task.model import build_model
    from fed_app.task.train import autocast, make_optimizer, resolve_device, training_module

    device = resolve_device(cfg)
    data = load_dataset(cfg, device)
    model, spec = build_model(cfg.replace(model_weights="random" if cfg.model == "vit-small-dino" else ""), 100)
    model.to(device).train()
    g = torch.Generator(device=device).manual_seed(0)
    idx = [torch.randint(0, len(data.train), (cfg.batch_size,), device=device, generator=g) for _ in range(batches)]
    rows = []
    for size in sorted({spec.input_size, 224}):
        tf = BatchTransform(size, spec.mean, spec.std, augment=True, interpolation=spec.interpolation)

        def prepare(tf=tf):
            for i in idx:
                tf(data.train.images[i], g)

        seconds, _ = measure(prepare, device, repeats=3)
        rows.append({"stage": f"prepare batches at {size} px (crop+flip, resize, normalize)",
                     "images_per_s": batches * cfg.batch_size / seconds})
    opt = make_optimizer(cfg, model)
    tf = BatchTransform.for_model(spec, augment=True)
    precision = autocast(cfg, device)

    def train(module: torch.nn.Module, batches: list[torch.Tensor] = idx) -> None:
        for i in batches:
            with precision:
                loss = torch.nn.functional.cross_entropy(module(tf(data.train.images[i], g)), data.train.labels[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    seconds, _ = measure(lambda: train(model), device, repeats=5)
    what = f"training step incl. preparation ({cfg.model}, {spec.input_size} px"
    rows.append({"stage": f"{what}, eager)", "images_per_s": batches * cfg.batch_size / seconds})
    compiled = training_module(cfg.replace(compile=True), model)
    started = time.perf_counter()
    train(compiled, idx[:1])  # the compilation, paid once per worker process
    sync(device)
    first = time.perf_counter() - started
    seconds, _ = measure(lambda: train(compiled), device, repeats=5)
    rows.append({"stage": f"{what}, torch.compile; compiling took {first:.1f} s)",
                 "images_per_s": batches * cfg.batch_size / seconds})
    return rows


def print_data(rows: list[dict], header: str) -> None:
    print_table(header, ["stage", "images / s"], [[r["stage"], f"{r['images_per_s']:,.0f}"] for r in rows])
